"""Beaver triples over Z_2^64 and the one Beaver routine for products of additive shares.

A value ``x`` is shared as ``x = x_c + x_s mod 2^64`` (client share, server share). A product
of two shared values needs a triple ``(a, b, c = a * b)``, itself shared, drawn uniformly and
used once: both parties open ``e = x - a`` and ``d = y - b`` (uniform, so they say nothing
about ``x`` or ``y``), and then ``z = c + e*b + a*d + e*d`` (the public ``e*d`` added by one
party only). The same algebra with ``@`` in place of ``*`` gives a matrix product from a
matrix triple ``(A, B, C = A @ B)``: that is what Q.K^T and softmax.V on shares use.

Triples come from a :class:`TripleProvider`:

- :class:`DealerProvider` draws them at the client's trusted dealer (the offline phase of
  DESIGN.md s2). **The dealer knows a, b and c, and could therefore unmask every opened value
  e = x - a:** it must be the client itself or someone the client trusts with its prompt.
  It never is the server (the seeds' V3-MPC let the server hold the triples, which leaks
  everything, seed 001 s6).
- :class:`beaver_ot.OTProvider`: client and server generate triples jointly with Gilboa
  multiplication over IKNP correlated OT, so that nobody knows a, b or c (elementwise and
  matrix triples; boolean AND triples, which the comparisons need, from random OTs).

Single use: every triple carries a serial number; :meth:`Triple.take` hands out its shares
once and refuses a second use with :class:`TripleReuseError` (a reused triple opens
``x - a`` and ``x' - a``, whose difference is ``x - x'`` in the clear).

Every share, mask and triple is drawn from :class:`ring.MaskPRG` (AES-256-CTR keyed by
``os.urandom``); torch/numpy default generators are never used.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, NamedTuple, Sequence

import torch

from .. import ring
from .void import VOID


class TripleReuseError(Exception):
    """A Beaver triple was asked for a second time."""


class _SingleUse:
    serial: int
    used: bool

    def take(self):
        if self.used:
            raise TripleReuseError(f"Beaver triple #{self.serial} was already used; triples are single-use")
        self.used = True
        return self


@dataclasses.dataclass
class Triple(_SingleUse):
    """Shares of ``a``, ``b`` and ``c = a * b`` (``kind='mul'``), ``c = a @ b`` (``kind='matmul'``), or
    XOR shares with ``c = a & b`` (``kind='and'``)."""

    serial: int
    kind: str
    a: tuple[torch.Tensor, torch.Tensor]  # (client share, server share)
    b: tuple[torch.Tensor, torch.Tensor]
    c: tuple[torch.Tensor, torch.Tensor]
    used: bool = False


@dataclasses.dataclass
class Correlation(_SingleUse):
    """A Beaver triple generalised to a polynomial's monomials (protocols/mpc/poly.py): shares of
    masks ``a_i`` and of the products ``prod_{i in S} a_i`` for each multiset ``S`` of mask
    indices (sorted tuples, size >= 2). ``((0,), (1,))`` masks with ``{(0, 1): ...}`` is a triple.

    Kept as one block per side (client, server): that side's ``n`` masks then its products in the
    order of ``subsets``, stacked (``(n + len(subsets), *shape)``; :data:`void.VOID` for a side this
    party does not hold): the evaluation (poly.shares) reads the block as it is."""

    serial: int
    n: int
    subsets: tuple[tuple[int, ...], ...]
    blocks: tuple[torch.Tensor, torch.Tensor]
    # masks that are random bits (``bit_slots``): their values, which only the dealer (the client,
    # or the simulator) holds (VOID on the server): an XOR-masked opening needs them
    bits: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    used: bool = False

    @functools.cached_property
    def masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(*(b[:self.n].unbind(0) if b is not VOID else [VOID] * self.n for b in self.blocks)))

    @property
    def prods(self) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
        m = len(self.subsets)
        return dict(zip(self.subsets, zip(*(b[self.n:].unbind(0) if b is not VOID else [VOID] * m for b in self.blocks))))


def mask_products(masks: list[torch.Tensor], subsets: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], torch.Tensor]:
    """``prod_{i in S} masks[i]`` mod 2^64 for each S (sorted by size, so ``S[:-1]`` comes first)."""
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for S in subsets:
        out[S] = (masks[S[0]] if len(S) == 2 else out[S[:-1]]) * masks[S[-1]]
    return out


def _share(prg: ring.MaskPRG, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = prg.ring(*v.shape)
    return r, v - r


class TripleProvider:
    """Where Beaver triples come from. Subclasses implement :meth:`_make`."""

    name = "abstract"
    # True where the client is (or a simulation's) dealer: it knows every mask, so a bit of the
    # server's may be opened to it as it is (shares.ServerBit); never for jointly generated triples
    client_deals = False

    def __init__(self):
        self._serials = itertools.count()
        self.issued = {"mul": 0, "matmul": 0}  # triples issued
        self.elements = {"mul": 0, "matmul": 0}  # ring elements of c issued (a size measure)

    def and_(self, shape: Sequence[int]) -> Triple:
        """A boolean triple: 64 independent bit triples per int64 word, ``c = a & b`` XOR-shared."""
        t = self._make("and", tuple(shape), None)
        self.issued["and"] = self.issued.get("and", 0) + 1
        self.elements["and"] = self.elements.get("and", 0) + math.prod(shape)  # words of 64 AND bits
        return t

    def mul(self, shape: Sequence[int]) -> Triple:
        """An elementwise triple of ``shape``."""
        t = self._make("mul", tuple(shape), None)
        self.issued["mul"] += 1
        self.elements["mul"] += math.prod(shape)
        return t

    def poly(self, shape: Sequence[int], n: int, subsets: Sequence[tuple[int, ...]],
             bit_slots: Sequence[int] = ()) -> Correlation:
        """``n`` masks of ``shape`` and the products over ``subsets`` (see :class:`Correlation`);
        the masks ``bit_slots`` are random bits (only a provider whose dealer is the client)."""
        if bit_slots and not self.client_deals:
            raise ValueError("bit masks need the client as dealer (it opens v XOR a itself)")
        key = ("poly", n, tuple(subsets)) + ((tuple(bit_slots),) if bit_slots else ())
        t = self._make(key, tuple(shape), None)
        self.issued["poly"] = self.issued.get("poly", 0) + 1
        self.elements["poly"] = self.elements.get("poly", 0) + math.prod(shape) * len(subsets)
        return t

    def matmul(self, a_shape: Sequence[int], b_shape: Sequence[int]) -> Triple:
        """A matrix triple for ``(..., m, k) @ (..., k, n)``."""
        t = self._make("matmul", tuple(a_shape), tuple(b_shape))
        self.issued["matmul"] += 1
        self.elements["matmul"] += math.prod(a_shape[:-1]) * b_shape[-1]
        return t

    def _make(self, kind: str, a_shape, b_shape) -> Triple:
        raise NotImplementedError


class PooledProvider(TripleProvider):
    """Elementwise (and, where a subclass makes them in bulk, boolean) triples sliced from flat
    pools made ``batch`` elements (resp. ``batch`` 64-bit words) at a time: one bulk generation
    instead of one per product. A pool's cursor only moves forward, so every element (every AND
    bit) is handed out once; :meth:`prefill` makes the first pools ahead of time (the offline
    phase). Subclasses implement :meth:`_new_pool` (and :meth:`_make` for the other kinds)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch
        # kind -> (the real ones of a_c, a_s, b_c, b_s, c_c, c_s (or masks and products) stacked,
        # which of those are the other party's VOID)
        self._pools: dict = {}
        self._cursors: dict[str, int] = {}
        self.prefill_kinds: tuple[str, ...] = ("mul",)

    def _new_pool(self, n: int, kind: str = "mul") -> list[torch.Tensor]:
        raise NotImplementedError

    def prefill(self, n: int | None = None) -> None:
        for kind in self.prefill_kinds:
            self._refill(kind, n or self.batch)

    def _refill(self, kind, need: int) -> None:
        # a polynomial's correlation holds n masks and their products per element: pools of about
        # ``batch`` ring elements (a max's winner products hold ~100 per element, a truncation's 3)
        batch = self.batch if isinstance(kind, str) else max(self.batch // (kind[1] + len(kind[2])), 1)
        flat = self._new_pool(max(need, batch), kind)
        # kept as one (tensors, elements) block of this party's real tensors: a take slices it once
        self._pools[kind] = (torch.stack([t for t in flat if t is not VOID]), [t is VOID for t in flat])
        self._cursors[kind] = 0

    def pool_size(self, kind) -> int:
        """Elements (words) in the current pool of ``kind`` (0 before the first)."""
        return self._pools[kind][0].shape[1] if kind in self._pools else 0

    def _pooled(self, kind, a_shape) -> Triple | Correlation:
        n = math.prod(a_shape)
        if self._cursors.get(kind, 0) + n > self.pool_size(kind):
            self._refill(kind, n)
        block, void = self._pools[kind]
        at = self._cursors[kind]
        self._cursors[kind] = at + n  # the pool's cursor only moves forward: every element is used once
        if isinstance(kind, tuple):
            rows = block[:, at:at + n].reshape(block.shape[0], *a_shape)
            real = list(itertools.accumulate((not v for v in void), initial=0))  # flat index -> row
            flat = [VOID if v else _Row(rows, real[i]) for i, v in enumerate(void)]
            return _correlation(next(self._serials), kind, flat)
        rows = iter(block[:, at:at + n].reshape(block.shape[0], *a_shape).unbind(0))
        p = [VOID if v else next(rows) for v in void]
        return Triple(next(self._serials), kind, (p[0], p[1]), (p[2], p[3]), (p[4], p[5]))


class _Row(NamedTuple):
    """Row ``i`` of a pool's block, not yet sliced out (:func:`_correlation` takes the rows it can
    as one slice)."""
    rows: torch.Tensor
    i: int


def _correlation(serial: int, key: tuple, flat: list) -> Correlation:
    """A :class:`Correlation` from its tensors laid out as (client, server) pairs: the masks,
    then the products in the order of ``key = ("poly", n, subsets[, bit slots])``, then (the
    client's) bit masks' values. Entries may be :class:`_Row` s of one pool block: a side's masks
    and products are then one slice of it, not a copy."""
    n, subsets, bits = key[1], key[2], key[3] if len(key) > 3 else ()
    m = n + len(subsets)

    def block(side: int):
        part = flat[side:2 * m:2]
        if part[0] is VOID:
            return VOID
        if isinstance(part[0], _Row):
            at, step = part[0].i, (part[1].i - part[0].i if m > 1 else 1)
            if all(r.i == at + j * step for j, r in enumerate(part)):
                return part[0].rows[at:at + m * step:step]
            part = [r.rows[r.i] for r in part]
        return torch.stack(part)

    def value(t):
        return t.rows[t.i] if isinstance(t, _Row) else t
    return Correlation(serial, n, tuple(subsets), (block(0), block(1)),
                       {j: value(flat[2 * (m + i)]) for i, j in enumerate(bits)})


class DealerProvider(TripleProvider):
    """Triples from the client's trusted dealer (who could unmask: see the module docstring)."""

    name = "dealer"
    client_deals = True

    def __init__(self, seed: bytes | None = None):
        super().__init__()
        self.prg = ring.MaskPRG(seed)

    def _make(self, kind, a_shape, b_shape) -> Triple | Correlation:
        if isinstance(kind, tuple):  # ("poly", n, subsets[, bit slots])
            bits = kind[3] if len(kind) > 3 else ()
            masks = [self.prg.ring(*a_shape) & (1 if j in bits else -1) for j in range(kind[1])]
            prods = mask_products(masks, kind[2])
            flat = [t for v in masks + [prods[S] for S in kind[2]] for t in _share(self.prg, v)]
            flat += [t for j in bits for t in (masks[j], VOID)]
            return _correlation(next(self._serials), kind, flat)
        a = self.prg.ring(*a_shape)
        if kind == "and":  # XOR shares
            b = self.prg.ring(*a_shape)
            c = a & b
            sh = [(r, v ^ r) for v in (a, b, c) for r in [self.prg.ring(*a_shape)]]
            return Triple(next(self._serials), kind, *sh)
        if kind == "mul":
            b = self.prg.ring(*a_shape)
            c = a * b  # wraps mod 2^64
        else:
            b = self.prg.ring(*b_shape)
            c = torch.matmul(a, b)  # int64 matmul wraps mod 2^64
        return Triple(next(self._serials), kind, _share(self.prg, a), _share(self.prg, b), _share(self.prg, c))


class SeededDealerProvider(PooledProvider):
    """The client as the dealer of a networked session, each party holding only its own shares.

    The server's shares of a, b *and* c are expanded from one 32-byte seed the client draws and
    sends it at set-up (``MaskPRG``, AES-256-CTR; the server expands in the same order as the
    client). The client draws its ``a_c, b_c`` from its own PRG and sets
    ``c_c = (a_c + a_s)(b_c + b_s) - c_s``: the only party needing an explicit c share is the
    dealer itself, so no triple material of size |c| crosses the wire (the usual seed
    compression of a trusted dealer). The server's shares are uniform and independent of a, b.
    **The client knows a, b and c, so it could unmask every value the server opens:** that is
    harmless only because the client is the owner of the prompt; the server may never deal.

    Elementwise and boolean triples come from pools of ``batch`` elements (words) (the first
    dealt in the offline phase, refills where a pool runs dry, at the same point on both sides);
    matrix triples are dealt when asked for. Both parties' engines request the same kinds and shapes in
    the same order, so the streams stay aligned. The other party's slot is :data:`void.VOID`.
    """

    name = "dealer"
    client_deals = True

    def __init__(self, role: str, seed: bytes, batch: int = 1 << 20):
        super().__init__(batch)
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self.server_prg = ring.MaskPRG(seed)
        self.prefill_kinds = ("mul", "and")  # ~1,500 AND requests per SmolLM2 token: sliced from a pool
        self.own_prg = ring.MaskPRG() if role == "client" else None

    def _deal(self, kind, a_shape, b_shape, c_shape) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a_s, b_s, c_s = (self.server_prg.ring(*sh) for sh in (a_shape, b_shape, c_shape))
        if self.role == "server":
            mine = (a_s, b_s, c_s)
        else:
            a_c, b_c = self.own_prg.ring(*a_shape), self.own_prg.ring(*b_shape)
            if kind == "and":  # XOR shares
                c_c = ((a_c ^ a_s) & (b_c ^ b_s)) ^ c_s
            else:
                op: Callable = torch.mul if kind == "mul" else torch.matmul  # wraps mod 2^64
                c_c = op(a_c + a_s, b_c + b_s) - c_s
            mine = (a_c, b_c, c_c)
        return [(m, VOID) if self.role == "client" else (VOID, m) for m in mine]

    def _new_pool(self, n: int, kind="mul") -> list[torch.Tensor]:
        if isinstance(kind, tuple):
            return [t for pair in self._deal_poly(n, kind[1], kind[2], kind[3] if len(kind) > 3 else ()) for t in pair]
        return [t for pair in self._deal(kind, (n,), (n,), (n,)) for t in pair]

    def _deal_poly(self, n: int, k: int, subsets, bits=()) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A polynomial correlation: the server's masks and product shares from its seed, the
        client's masks from its own PRG and its product shares ``prod (a_c + a_s) - p_s``; a bit
        mask (``bits``) is a random bit ``a`` (``a_c = a - a_s``), which the client also keeps."""
        masks_s = [self.server_prg.ring(n) for _ in range(k)]
        prods_s = [self.server_prg.ring(n) for _ in subsets]
        if self.role == "server":
            return [(VOID, m) for m in masks_s + prods_s] + [(VOID, VOID)] * len(bits)
        masks_c = [self.own_prg.ring(n) for _ in range(k)]
        full = [c + s for c, s in zip(masks_c, masks_s)]
        for j in bits:
            full[j] = full[j] & 1
            masks_c[j] = full[j] - masks_s[j]
        prods = mask_products(full, subsets)
        return [(m, VOID) for m in masks_c + [prods[S] - p for S, p in zip(subsets, prods_s)]] + \
            [(full[j], VOID) for j in bits]

    def _make(self, kind, a_shape, b_shape) -> Triple | Correlation:
        if kind in ("mul", "and") or isinstance(kind, tuple):
            return self._pooled(kind, a_shape)
        c_shape = (*a_shape[:-1], b_shape[-1])
        return Triple(next(self._serials), kind, *self._deal(kind, a_shape, b_shape, c_shape))


def beaver_combine(kind: str, t: Triple, e: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of ``x*y`` (or ``x@y``) from the opened ``e = x - a`` and ``d = y - b``.

    Client: ``c_c + e*b_c + a_c*d + e*d``; server: ``c_s + e*b_s + a_s*d``.
    """
    op: Callable = torch.mul if kind == "mul" else torch.matmul
    zc = t.c[0] + op(e, t.b[0]) + op(t.a[0], d) + op(e, d)
    zs = t.c[1] + op(e, t.b[1]) + op(t.a[1], d)
    return zc, zs
