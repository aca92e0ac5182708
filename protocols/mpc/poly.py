"""A shared value kept as a polynomial in shared variables, multiplied out in one round.

Beaver's trick works for any polynomial, not only for ``x y``: open ``d_i = v_i - a_i`` for every
variable (``a_i`` a fresh uniform mask), and every monomial
``v_1 v_2 ... v_m = prod (d_i + a_i)`` expands into public products of the ``d``'s times products
of the masks, whose shares a correlation supplies (the dealer's or the OT provider's; for
``m = 2`` that is a Beaver triple). So a value that is itself a polynomial in shared variables
can be a factor of a product *before* its own multiplications are done, and both happen in the
product's round.

What the engine uses this for (protocols/mpc/engine.py):

- a truncation is ``L - 2^(64-k) (mc + ms - mc ms)`` (local shifts ``L``, the two parties'
  private MSB bits ``mc``, ``ms``, one product): kept as that polynomial, the product that
  consumes it opens the wrap bits with its own factors, so a chain of products costs one round per
  product instead of two (``x y``'s truncation rides in the round of ``(x y) z``);
- the XOR-to-additive step of a comparison bit ``1 - bc - bs + 2 bc bs`` rides in the round of
  the product that uses the bit.

Every opened ``d_i`` is a fresh uniform mask's difference, as in a Beaver product. A variable's
mask is shared by all the monomials of one round (one opening per variable). Coefficients are
public ring values (Python ints mod 2^64 or int64 tensors); a monomial is a sorted tuple of
variable indices, with repeats for powers (``(0, 0)`` is ``v_0^2``), ``()`` the constant.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch

Coef = int | torch.Tensor


def merge_vars(vars: list, at: dict[int, int], new: list) -> dict[int, int]:
    """Append to ``vars`` those of ``new`` it lacks (by identity; ``at``: id -> index, kept up to
    date) and return the index in ``vars`` of each of ``new``'s."""
    remap = {}
    for j, v in enumerate(new):
        if id(v) not in at:
            at[id(v)] = len(vars)
            vars.append(v)
        remap[j] = at[id(v)]
    return remap


def ring_int(v: int) -> int:
    """A Python int as the int64 that stands for it mod 2^64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _cmul(a: Coef, b: Coef) -> Coef:
    if isinstance(a, int) and isinstance(b, int):
        return ring_int(a * b)
    return a * b  # int64 tensors wrap mod 2^64


def _cadd(a: Coef, b: Coef) -> Coef:
    if isinstance(a, int) and isinstance(b, int):
        return ring_int(a + b)
    return a + b


def _as_int(c: torch.Tensor, shape) -> Coef:
    """A tensor coefficient whose elements are all equal (and which broadcasts to the value's
    shape) as that int: e.g. per-column shifts that happen to agree, or ``2^(64-k) 2^(64-k')``
    = 0 mod 2^64 everywhere. Its terms then take the int path (and a 0 drops out)."""
    if c.dim() > len(shape) or any(a not in (1, b) for a, b in zip(reversed(c.shape), reversed(shape))):
        return c  # it widens the value: keep it (torch.broadcast_shapes imports sympy and is slow)
    flat = c.reshape(-1)
    return int(flat[0]) if flat.numel() and bool((flat == flat[0]).all()) else c


def _is_zero(c: Coef) -> bool:
    return isinstance(c, int) and c == 0


class Poly:
    """``sum_j coef_j prod_{i in mono_j} vars[i]`` over :class:`shares.Shared` variables of one shape.

    ``source``: for a truncation, the untruncated value and the shift (a comparison can read the
    sign from it, a further truncation can start from it)."""

    def __init__(self, vars: list, terms: dict[tuple[int, ...], Coef], source=None):
        self.vars = vars
        terms = {m: _as_int(c, vars[0].shape) if isinstance(c, torch.Tensor) else c for m, c in terms.items()}
        self.terms = {m: c for m, c in terms.items() if not _is_zero(c)}
        self.source = source

    @classmethod
    def of(cls, x) -> "Poly":
        """``x`` as a polynomial: a shared value as the one variable, a polynomial as it is."""
        return x if isinstance(x, Poly) else cls([x], {(0,): 1})

    @property
    def shape(self):
        return self.vars[0].shape

    def _merged(self, other: "Poly") -> tuple[list, dict[int, int]]:
        """Variables of both (shared by identity) and the index map of ``other``'s."""
        vars = list(self.vars)
        return vars, merge_vars(vars, {id(v): i for i, v in enumerate(vars)}, other.vars)

    def __add__(self, other) -> "Poly":
        other = Poly.of(other)
        vars, remap = self._merged(other)
        terms = dict(self.terms)
        for m, c in other.terms.items():
            key = tuple(sorted(remap[i] for i in m))
            terms[key] = _cadd(terms[key], c) if key in terms else c
        return Poly(vars, terms)

    def __neg__(self) -> "Poly":
        return self.scale(-1)

    def __sub__(self, other) -> "Poly":
        return self + (-Poly.of(other))

    def __radd__(self, other) -> "Poly":
        return self + other

    def __rsub__(self, other) -> "Poly":
        return Poly.of(other) - self

    def __mul__(self, other: "Poly") -> "Poly":
        vars, remap = self._merged(other)
        terms: dict[tuple[int, ...], Coef] = {}
        for (m1, c1), (m2, c2) in itertools.product(self.terms.items(), other.terms.items()):
            c = _cmul(c1, c2)
            if _is_zero(c):  # e.g. 2^(64-k) 2^(64-k') = 0 mod 2^64
                continue
            key = tuple(sorted(m1 + tuple(remap[i] for i in m2)))
            terms[key] = _cadd(terms[key], c) if key in terms else c
        return Poly(vars, terms)

    def scale(self, v: Coef) -> "Poly":
        """``v`` times the value, for a public ring integer ``v``."""
        return Poly(self.vars, {m: _cmul(c, v) for m, c in self.terms.items()})

    def add_public(self, v: Coef) -> "Poly":
        """Plus the public ring value ``v`` (already encoded)."""
        terms = dict(self.terms)
        terms[()] = _cadd(terms[()], v) if () in terms else v
        return Poly(self.vars, terms)

    def map(self, fn) -> "Poly":
        """A share-wise rearrangement (view, expand, slice) of the value: of every variable and
        every tensor coefficient (the products are elementwise, so they commute with it)."""
        return Poly([v.map(fn) for v in self.vars],
                    {m: fn(c) if isinstance(c, torch.Tensor) and c.dim() else c for m, c in self.terms.items()})


def _low_zeros(c: Coef) -> int:
    """How many low bits of the coefficient are 0 (64 for 0): an opened value multiplied by it
    matters only in its low ``64 - that`` bits."""
    if isinstance(c, int):
        return 64 if c == 0 else ((c & -c).bit_length() - 1)
    return 0


class Plan(NamedTuple):
    vars: list
    terms: list  # each poly's terms over ``vars``
    opened: list[int]  # the masked variables (in the order of their masks), then the shown ones
    subsets: list[tuple[int, ...]]  # the mask products the correlation holds
    need: list[int]  # per opened variable, the low bits of its opening that are read
    n_masked: int
    bit_slots: tuple[int, ...]  # masks that are random bits: those variables open XOR-masked


def plan(polys: list[Poly], shown=None, xor=None) -> Plan:
    """One round's evaluation of ``polys`` (of one shape) with one mask per variable.

    The variables are merged by identity. Opened are those in a monomial of degree >= 2: first
    the masked ones, in the order of their masks, then those ``shown(var)`` says are opened as
    they are, without a mask. A variable ``xor(var)`` says is a bit gets a random bit as its mask
    and opens as ``v XOR a`` (one bit; ``v = d + (1 - 2d) a``). The correlation holds the
    products of every sub-multiset of size >= 2 of every monomial's masked variables (over mask
    indices, sorted). Only the low bits of an opening that are read travel (ring.pack_low): a
    truncation's wrap bits only appear times ``2^(64-k)``, so their low k bits; a shown or XOR
    masked bit its lowest."""
    vars, terms, at = [], [], {}
    for p in polys:
        remap = merge_vars(vars, at, p.vars)
        terms.append({tuple(sorted(remap[i] for i in m)): c for m, c in p.terms.items()})
    used = {i for t in terms for m in t if len(m) >= 2 for i in m}
    bare = {i for i in used if shown is not None and shown(vars[i])}
    opened = sorted(used - bare) + sorted(bare)
    bits = {i for i in used - bare if xor is not None and xor(vars[i])}
    need = {i: 1 if i in bare or i in bits else 0 for i in opened}
    for t in terms:
        for m, c in t.items():
            if len(m) >= 2:
                for i in m:
                    if not (i in bare or i in bits):
                        need[i] = max(need[i], 64 - _low_zeros(c))
    slot = {v: j for j, v in enumerate(opened)}
    subsets = set()
    for t in terms:
        for m in t:
            if len(m) >= 2:
                masked = tuple(slot[i] for i in m if i not in bare)
                for r in range(2, len(masked) + 1):
                    subsets.update(itertools.combinations(masked, r))
    return Plan(vars, terms, opened, sorted(subsets, key=lambda s: (len(s), s)), [need[i] for i in opened],
                len(opened) - len(bare), tuple(sorted(slot[i] for i in bits)))


@functools.lru_cache(maxsize=None)
def expansion(m: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]:
    """``prod_{i in m} (d_i + a_i)`` as ``sum count * prod_{rest} d * A_chosen`` (multisets of mask
    indices; ``A_()`` is 1, ``A_(i)`` the mask, larger ones the correlation's products)."""
    acc: dict[tuple, int] = {}
    for r in range(len(m) + 1):
        for chosen in itertools.combinations(range(len(m)), r):
            key = (tuple(m[j] for j in range(len(m)) if j not in chosen), tuple(m[j] for j in chosen))
            acc[key] = acc.get(key, 0) + 1
    return tuple((c, rest, T) for (rest, T), c in acc.items())


class _Batch(NamedTuple):
    """Pieces ``coef * F[ia] (* F[ib]) (* C[ic])`` (``ib`` None: a piece of one factor), sorted by output polynomial: ``segs`` holds
    each one's ``(polynomial, first, end)`` (a slice sum per polynomial: index_add_ goes row by row)."""
    ia: torch.Tensor
    ib: torch.Tensor | None
    ic: torch.Tensor | None  # rows of the tensor coefficients C (then ``coef`` is the count)
    coef: torch.Tensor | None  # None: all 1
    segs: tuple[tuple[int, int, int], ...]


class _Program(NamedTuple):
    """:func:`shares` compiled for one round's structure: the rows of the factor table F (this
    party's variable shares, its masks and their products, then the public products of opened
    values, built level by level), and every piece ``coef * F[ia] (* F[ib])`` of every
    polynomial as index tensors, so that a round is a few tensor operations whatever its size."""
    n_vars: int
    n_mask_rows: int  # masks then products, in the order of the plan's subsets
    levels: tuple  # per product length >= 2: (prefix row in the previous level, base row) index tensors
    n_pub: int  # rows of the public table (the bases: opened values, then 1 - 2 d_j per bit mask)
    t_terms: tuple  # tensor coefficients: (polynomial, term index) of each, in the order of C's rows
    batches: tuple  # of :class:`_Batch`: the int-coefficient linear, quadratic and tensor-coefficient pieces
    consts: tuple  # (polynomial, int constant)
    t_consts: tuple  # (polynomial, term index) of a tensor constant, added as it is


_PROGRAMS: dict = {}


def _program(sig: tuple, public: bool, n_masked: int, n_open: int, bit_slots: tuple[int, ...], subsets) -> _Program:
    """The :class:`_Program` of a round with structure ``sig`` (per polynomial, per term: ``("v",
    var)`` for a degree-1 term, else the opened indices of its variables; its int coefficient or
    None for a tensor one), cached: the same call sites recur every token. ``subsets`` (the
    plan's, a function of ``sig`` and ``n_masked``) are read on a miss only. Opened indices from
    ``n_masked`` on were opened without a mask: no piece chooses their mask. A piece's public
    factor is the product of the opened values it keeps times ``1 - 2 d_j`` for each bit mask j
    it chooses (``v = d + (1 - 2d) a`` for an XOR-masked bit)."""
    key = (sig, public, n_masked, n_open, bit_slots)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    n_vars = 1 + max((m[1] for t in sig for m, _ in t if m and m[0] == "v"), default=-1)
    mask_row = {(i,): i for i in range(n_masked)} | {S: n_masked + j for j, S in enumerate(subsets)}
    bit_base = {j: n_open + k for k, j in enumerate(bit_slots)}  # the base row of 1 - 2 d_j
    pub: dict[tuple[int, ...], int] = {}  # sorted base rows -> (level, row in level)
    level_rows: list[list[tuple[int, int]]] = [[]]  # level 0 (the bases) is not built: listed empty
    reads_bases = False

    def pub_row(bases: tuple[int, ...]) -> tuple[int, int]:
        nonlocal reads_bases
        reads_bases = True
        if len(bases) == 1:
            return 0, bases[0]
        if bases not in pub:
            lv, r = pub_row(bases[:-1])
            while len(level_rows) <= len(bases) - 1:
                level_rows.append([])
            pub[bases] = (len(bases) - 1, len(level_rows[len(bases) - 1]))
            level_rows[len(bases) - 1].append((r, bases[-1]))
        return pub[bases]

    ints, tens, consts, t_consts, t_terms = {}, [], [], [], []
    for p, terms in enumerate(sig):
        for j, (m, coef) in enumerate(terms):
            if len(m) == 0:
                if public and coef is None:
                    t_consts.append((p, j))
                elif public:
                    consts.append((p, coef))
                continue
            if m[0] == "v":
                pieces = [(1, ("v", m[1]), None)]
            else:
                pieces = []
                for cnt, rest, T in expansion(m):
                    if not (T or public) or any(t >= n_masked for t in T):
                        continue
                    bases = tuple(sorted(rest + tuple(bit_base[t] for t in T if t in bit_base)))
                    pieces.append((cnt, ("a", T) if T else None, bases or None))
            if coef is None:
                t_terms.append((p, j))
            for cnt, a, b in pieces:
                # a piece of one factor has it first (and then "one" second: no gather, no product)
                fa, fb = (a, ("one",) if b is None else ("p",) + pub_row(b)) if a is not None else (("p",) + pub_row(b), ("one",))
                if coef is None:
                    tens.append((fa, fb, len(t_terms) - 1, cnt, p))
                else:
                    k = (fa, fb, p)
                    ints[k] = ring_int(ints.get(k, 0) + coef * cnt)
    # F's rows: variables, masks and products, then the public levels (level 0: the bases)
    n_mask_rows = n_masked + len(subsets)
    offs = [n_vars + n_mask_rows, n_vars + n_mask_rows + n_open + len(bit_slots)]
    for lv in level_rows[1:]:
        offs.append(offs[-1] + len(lv))

    def row(f) -> int | None:
        if f[0] == "one":
            return None
        if f[0] == "v":
            return f[1]
        if f[0] == "a":
            return n_vars + mask_row[f[1]]
        return offs[f[1]] + f[2]

    lin = sorted((p, row(a), c) for (a, b, p), c in ints.items() if c and b == ("one",))
    quad = sorted((p, row(a), row(b), c) for (a, b, p), c in ints.items() if c and b != ("one",))
    t_lin = sorted((p, row(a), ic, cnt) for a, b, ic, cnt, p in tens if b == ("one",))
    t_quad = sorted((p, row(a), row(b), ic, cnt) for a, b, ic, cnt, p in tens if b != ("one",))
    batches = [_batch([t[0] for t in lin], [t[1] for t in lin], None, None, [t[2] for t in lin]),
               _batch([t[0] for t in quad], [t[1] for t in quad], [t[2] for t in quad], None, [t[3] for t in quad]),
               _batch([t[0] for t in t_lin], [t[1] for t in t_lin], None, [t[2] for t in t_lin], [t[3] for t in t_lin]),
               _batch([t[0] for t in t_quad], [t[1] for t in t_quad], [t[2] for t in t_quad], [t[3] for t in t_quad],
                      [t[4] for t in t_quad])]
    prog = _Program(
        n_vars, n_mask_rows,
        tuple((_long([r for r, _ in lv]), _long([b for _, b in lv])) for lv in level_rows[1:]),
        n_open + len(bit_slots) if reads_bases else 0,
        tuple(t_terms), tuple(b for b in batches if b is not None), tuple(consts), tuple(t_consts))
    if len(_PROGRAMS) >= 8192:  # a long chat keeps making new shapes of the max's groups
        _PROGRAMS.clear()
    _PROGRAMS[key] = prog
    return prog


def _long(v: list) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def _batch(prow: list[int], ia: list[int], ib: list[int] | None, ic: list[int] | None, coef: list[int]) -> _Batch | None:
    """A :class:`_Batch` of pieces already sorted by output polynomial ``prow`` (None if empty)."""
    if not prow:
        return None
    segs, lo = [], 0
    for i in range(1, len(prow) + 1):
        if i == len(prow) or prow[i] != prow[lo]:
            segs.append((prow[lo], lo, i))
            lo = i
    return _Batch(_long(ia), None if ib is None else _long(ib), None if ic is None else _long(ic),
                  None if all(c == 1 for c in coef) else _long(coef), tuple(segs))


_CHUNK = 1 << 22  # ring elements of pieces materialised at once (32 MB)


def _accumulate(out: torch.Tensor, F: torch.Tensor, C: torch.Tensor | None, b: _Batch) -> None:
    """``out[p] += sum of p's pieces`` for the batch ``b``, a chunk of pieces at a time."""
    step = max(1, _CHUNK // max(1, F.shape[1]))
    for lo in range(0, b.ia.numel(), step):
        hi = lo + step
        G = F.index_select(0, b.ia[lo:hi])
        if b.ib is not None:
            G.mul_(F.index_select(0, b.ib[lo:hi]))
        if b.ic is not None:
            G.mul_(C.index_select(0, b.ic[lo:hi]))
        if b.coef is not None:
            G.mul_(b.coef[lo:hi, None])
        for p, s0, s1 in b.segs:
            if s0 < hi and s1 > lo:
                out[p] += G[max(s0, lo) - lo:min(s1, hi) - lo].sum(0)


def shares(polys: list[dict[tuple[int, ...], Coef]], slot: dict[int, int], d: list[torch.Tensor], var_shares: list,
           block: torch.Tensor | None, public: bool, n_masked: int, bit_slots: tuple[int, ...],
           subsets: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """This party's share of each ``sum coef prod_{i in m} v_i`` (the terms of one round's
    polynomials) from the opened ``d_j = v - a_j`` (by mask index ``slot[i]``), its shares of the
    variables, and its block of the correlation (the masks, then their products in the order of
    ``subsets``; a Beaver product per monomial, expanded by :func:`expansion`). ``public``: this
    party adds the public terms (the constant and the products of opened values: the client).
    ``d`` from ``n_masked`` on: variables opened without a mask (their own values: no mask
    product involves them); ``bit_slots``: masks that are random bits, whose variables were
    opened XOR-masked (see :func:`plan`)."""
    sig = tuple(tuple((("v", m[0]) if len(m) == 1 else tuple(slot[i] for i in m), c if isinstance(c, int) else None)
                      for m, c in terms.items()) for terms in polys)
    prog = _program(sig, public, n_masked, len(d), tuple(bit_slots), subsets)
    shape = var_shares[0].shape
    n = var_shares[0].numel()
    rows = []
    if prog.n_vars:
        rows.append(torch.stack(var_shares[:prog.n_vars]).reshape(-1, n))
    if prog.n_mask_rows:
        rows.append(block.reshape(-1, n))
    if prog.n_pub:
        base = level = torch.stack(list(d) + [1 - 2 * d[j] for j in bit_slots]).reshape(-1, n)
        rows.append(base)
        for parents, bases in prog.levels:
            level = level.index_select(0, parents) * base.index_select(0, bases)
            rows.append(level)
    F = torch.cat(rows) if len(rows) > 1 else rows[0] if rows else torch.zeros(0, n, dtype=torch.int64)
    out = torch.zeros(len(polys), n, dtype=torch.int64)
    coefs = [list(t.values()) for t in polys] if prog.t_terms or prog.t_consts else None
    C = torch.stack([torch.broadcast_to(coefs[p][j], shape).reshape(n) for p, j in prog.t_terms]) \
        if prog.t_terms else None
    for b in prog.batches:
        _accumulate(out, F, C, b)
    for p, c in prog.consts:
        out[p] += c
    outs = list(out.view(len(polys), *shape).unbind(0))
    for p, j in prog.t_consts:
        outs[p] = outs[p] + coefs[p][j]
    return outs


def value(terms: dict[tuple[int, ...], Coef], full: list[torch.Tensor]) -> torch.Tensor:
    """The polynomial's value from its variables' values (the simulator's ideal evaluation)."""
    out = torch.zeros_like(full[0])
    for m, c in terms.items():
        t = c
        for i in m:
            t = t * full[i]
        out = out + t
    return out
