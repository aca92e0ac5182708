"""A shared value kept as a polynomial in shared variables, multiplied out in one round.

Beaver's trick works for any polynomial, not only for ``x y``: open ``d_i = v_i - a_i`` for every
variable (``a_i`` a fresh uniform mask), and every monomial
``v_1 v_2 ... v_m = prod (d_i + a_i)`` expands into public products of the ``d``'s times products
of the masks, whose shares a correlation supplies (the dealer's or the OT provider's; for
``m = 2`` that is a Beaver triple). So a value that is itself a polynomial in shared variables
can be a factor of a product *before* its own multiplications are done, and both happen in the
product's round.

What the engine uses this for (protocols/mpc.py):

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


def _is_zero(c: Coef) -> bool:
    return isinstance(c, int) and c == 0


class Poly:
    """``sum_j coef_j prod_{i in mono_j} vars[i]`` over :class:`mpc.Shared` variables of one shape.

    ``source``: for a truncation, the untruncated value and the shift (a comparison can read the
    sign from it, a further truncation can start from it)."""

    def __init__(self, vars: list, terms: dict[tuple[int, ...], Coef], source=None):
        self.vars = vars
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


@functools.lru_cache(maxsize=4096)
def _compiled(sig: tuple, public: bool, n_masked: int, bit_slots: tuple[int, ...] = ()) -> tuple:
    """The pieces of :func:`shares` for one polynomial's structure ``sig`` (each term's mask
    indices and its coefficient, None for a tensor one), cached: the same call sites recur every
    token. Returns the constant (or None), the linear pieces ``(factor, coef)``, the quadratic
    pieces ``(factor, factor, coef)`` and the tensor-coefficient terms ``(term index, pieces)``,
    a factor being ``("v", var)``, ``("d", opened indices)``, ``("a", mask indices)`` or
    ``("db", opened indices, bit slots)`` (the opened values' product times ``1 - 2 d_j`` for each
    chosen bit mask j: ``v = d + (1 - 2d) a`` for an XOR-masked bit). Opened indices from
    ``n_masked`` on were opened without a mask: no piece chooses their mask."""
    const, lin, quad, tens = None, {}, {}, []
    for j, (m, coef) in enumerate(sig):
        if len(m) == 0:
            if public and coef is None:
                tens.append((j, None))  # a tensor constant: added as it is
            elif public:
                const = coef
            continue
        if m[0] == "v":
            pieces = [(1, ("v", m[1]), None)]
        else:
            pieces = []
            for cnt, rest, T in expansion(m):
                if not (T or public) or any(t >= n_masked for t in T):
                    continue
                js = tuple(t for t in T if t in bit_slots)
                pub = ("db", rest, js) if js else ("d", rest) if rest else None
                pieces.append((cnt, ("a", T), pub) if T else (cnt, pub, None))
        if coef is None:
            tens.append((j, tuple(pieces)))
            continue
        for cnt, a, b in pieces:
            acc, key = (lin, a) if b is None else (quad, (a, b))
            acc[key] = ring_int(acc.get(key, 0) + coef * cnt)
    return (const, tuple((a, c) for a, c in lin.items() if c), tuple((a, b, c) for (a, b), c in quad.items() if c),
            tuple(tens))


def shares(polys: list[dict[tuple[int, ...], Coef]], slot: dict[int, int], d: list[torch.Tensor], var_shares: list,
           masks: list, prods: dict, public: bool, n_masked: int | None = None,
           bit_slots: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """This party's share of each ``sum coef prod_{i in m} v_i`` (the terms of one round's
    polynomials) from the opened ``d_j = v - a_j`` (by mask index ``slot[i]``), its shares of the
    variables, the masks and their products (a Beaver product per monomial, expanded by
    :func:`expansion`). ``public``: this party adds the public terms (the constant and the
    products of opened values: the client). The products of opened values are made once for all
    the polynomials; the terms with integer coefficients are summed as two stacked tensor
    expressions per polynomial (instead of a multiply-add each). ``d`` from ``n_masked`` on: variables
    opened without a mask (their own values: no mask product involves them); ``bit_slots``: masks
    that are random bits, whose variables were opened XOR-masked (see :func:`plan`)."""
    dp: dict[tuple[int, ...], torch.Tensor] = {}

    def dprod(rest):  # products of opened values, shared by every monomial of the round
        if rest not in dp:
            dp[rest] = d[rest[0]] if len(rest) == 1 else dprod(rest[:-1]) * d[rest[-1]]
        return dp[rest]

    def beta(j):
        if ("b", j) not in dp:
            dp[("b", j)] = 1 - 2 * d[j]
        return dp[("b", j)]

    def get(f):
        kind, i = f[0], f[1]
        if kind == "v":
            return var_shares[i]
        if kind == "d":
            return dprod(i)
        if kind == "db":  # the opened values' product times 1 - 2 d_j per chosen bit mask
            if f not in dp:
                b = beta(f[2][0]) if len(f[2]) == 1 else get(("db", (), f[2][:-1])) * beta(f[2][-1])
                dp[f] = dprod(i) * b if i else b
            return dp[f]
        return masks[i[0]] if len(i) == 1 else prods[i]

    outs = []
    for terms in polys:
        # a degree-1 term is the variable's own share; higher ones go by their masks' indices
        sig = tuple((("v", m[0]) if len(m) == 1 else tuple(slot[i] for i in m),
                     c if isinstance(c, int) else None) for m, c in terms.items())
        const, lin, quad, tens = _compiled(sig, public, len(d) if n_masked is None else n_masked, bit_slots)
        out = torch.zeros_like(var_shares[0])
        if const is not None:
            out = out + const
        coefs = list(terms.values())
        for j, pieces in tens:
            if pieces is None:
                out = out + coefs[j]
                continue
            for cnt, a, b in pieces:
                out = out + (get(a) if b is None else get(a) * get(b)) * (coefs[j] * cnt)
        shape = (-1,) + (1,) * out.dim()
        if lin:
            out = out + (torch.stack([get(a) for a, _ in lin]) * torch.tensor([c for _, c in lin]).view(shape)).sum(0)
        if quad:
            out = out + (torch.stack([get(a) for a, _, _ in quad]) * torch.stack([get(b) for _, b, _ in quad])
                         * torch.tensor([c for _, _, c in quad]).view(shape)).sum(0)
        outs.append(out)
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
