"""v3-mpc arithmetic: every activation additively shared over Z_2^64, nonlinear layers on shares.

STATUS: this module is the share arithmetic and the plan executor, written once and run in two
ways. :class:`Engine` without a transport is a *two-party simulator* (both shares in one
process; what the accuracy tests measure). With a transport it is *one party* of the networked
``v3-mpc`` protocol (protocols/mpc_service.py): it holds only its own share, and every opening
is one message each way with the other party (all openings of a step batched into that one
round), the client's input and linear-layer re-shares are one-way messages, and only the
logits are revealed, to the client. Triples: the client as seeded dealer
(:class:`beaver.SeededDealerProvider`) or joint IKNP/Gilboa generation over the session channel
(:class:`beaver_ot.NetOTProvider`, AND triples from random OT). With comparisons a
SmolLM2 decode token takes ~2,350 rounds (~78 per layer; 3,280 before the lazy truncations
below, 11,727 before the earlier round cuts) and opens ~8 M ring elements; the rounds still
dominate the online time.

Rounds. :meth:`Engine.run` opens every Beaver product, matrix product and truncation wrap bit
of one step in one round; public factors and powers of two are folded into the truncation
that follows a product (``("mul", x, y, F + s, v)``: ``x y v / 2^(F+s)``) instead of costing a
round each, and operations take ``also`` items that ride in their first round (e.g. ``e @ V``
in the reciprocal's first product, ``gate * up`` in the clip's last round). A truncation
needs one product (its wrap bit, below) and so a round; a product's truncation asked for as
``Lazy(k)`` is kept as that unevaluated polynomial (protocols/poly.py) and multiplied out in
the round of the product that takes it as a factor, so a chain of products costs one round per
product, not two (exp's squarings, the Newton and reciprocal factors, the norm, the sigmoid).
Likewise a comparison's last step (XOR to additive, one product) rides in the round of the
product that uses the bit (``ltz(lazy=True)``: relu, the max's winner products, the sigmoid's
clip). The comparison ``ltz`` takes a public bound: the carry then runs over fewer bits (5 AND
rounds instead of 7 for |x| < 4000 with 1/8 slack, 6 exact), and its AND openings carry only
those bits (packed 4 to a ring element for p <= 16).

Encoding. A real ``x`` is the ring element ``round(x * 2^F)`` (``F = FRAC_BITS``), read as a
signed int64; shares ``x = x_c + x_s mod 2^64``.

Truncation (after each product, which doubles the scale). SecureML local truncation (each
party shifts its own share: no round) fails with probability ``|v| 2^(2F) / 2^63`` per element
(a gross error of ``2^(64-2F)``): at F = 20 that is 2^-23 for values around 1, and measured on
SmolLM2 it broke every forward (millions of truncations per token). So the default is a
one-round truncation with a known MSB: the client adds the public offset 2^62, so the value
``u = x + 2^62`` lies in [0, 2^63) for ``|x| < 2^62``; then the unsigned sum ``u_c + u_s``
wraps past 2^64 exactly when ``msb(u_c) OR msb(u_s)``, and
``u >> k = (u_c >> k) + (u_s >> k) - w 2^(64-k)`` up to the lost carry (one unit in the last
place, never more), with ``w = msb_c + msb_s - msb_c msb_s``; the product of the two parties'
private bits is one Beaver product. Every truncation of a step is batched into that one
round, or, lazy, the round of the product that consumes it (``L - 2^(64-k) w`` times ``y`` has
the monomials ``L y``, ``msb_c y``, ``msb_s y``, ``msb_c msb_s y``: one round with the matching
correlation). No failure probability as long as ``|x| < 2^62`` (values below 2^22 at scale 2^2F).
``Engine.local_trunc = True`` switches back to SecureML's local truncation (tests only).
With the client as dealer (``--triples dealer``) the two parties' own bits in a polynomial (a
truncation's ``msb_c``, ``msb_s``, a lazy comparison's) travel as one bit each instead of a
masked ring element: the server's as it is (:class:`ServerBit`: the client knows every mask and
could unmask it anyway), the client's XOR a random mask bit of the correlation
(:class:`ClientBit`: a uniform bit to the server). With OT triples both stay masked ring
elements, so the client's view stays uniform too.

Linear layers. The server's weights are integers with a per-row power-of-two scale
``2^k_j`` (``k_j`` public, about 20 significant bits per row). Networked, the client first
re-shares its share into a preprocessed mask ``r`` (it sends ``x_c - r``; the server now holds
``x - r``), the server computes ``W (x - r)`` on its device and the client takes ``W r`` from its
mask material (protocols/preprocess.py, dealt over these ring weights in the offline phase):
no heavy linear work for the client online. (The simulator computes ``W x_c`` and ``W x_s``,
the same sum.) Then the truncation by ``k_j`` (the wrap-bit scheme below) restores scale 2^F.

Nonlinear functions (each documented with its range and measured error in the tests;
rounds as measured by tests/test_mpc_units.py):

- ``exp``: limit form ``p(x/2^n)^(2^n)``, p the degree-4 (or 6) Taylor polynomial with its
  coefficients folded into the products' truncations (two product levels for degree 4, three
  for 6), n squarings: 5 + 2n rounds. Default n = 8, accurate for x in [-12, 8] (rel. err
  < 2e-3); x above ~10 overflows the ring. Each product's truncation rides in the next product's
  round (see Rounds). The softmax takes u = (x - max) / 162 out of the max and raises p(u) to
  the 162nd power by four cubings (a product of three factors is one round: y^3 <= 1 at scale
  2^3F) and a squaring (rel. err < 1e-3 on [-12, 0.5], within 1e-5 of 0 down to -440; below
  ~-450 it grows again: SmolLM2's score spread is < 60 on the accuracy text); the sigmoid
  degree 6 with n = 3 on [-16, 0] (its result kept with 6 more fraction bits).
- ``reciprocal``: without comparisons Newton ``y <- y (2 - x y)`` from ``3 exp(0.5 - x) + 0.003``
  for x in [0.01, 500] (14 iterations, ~78 rounds, rel. err < 1e-3). With comparisons
  (``cmp=True``, the caller's public range [lo, hi]): one batch of bounded comparisons against
  thresholds ``lo 2^(i/per_octave)`` picks ``y0 = 2 / (t_{j-1} + t_j)`` for x's interval, so
  ``e = 1 - x y0`` lies within ``(r-1)/(r+1)`` (1/3 for octaves, plus the comparisons' slack);
  then ``y0 (1+e)(1+e^2)...(1+e^(2^(s-1)))`` has relative error ``e^(2^s)`` in 2 + 2s rounds.
  Softmax: 4 thresholds per octave, s = 2 (12 rounds, < 2e-4). The sigmoid's 1/(1 + t) over
  [1, 2.14] needs no comparison (one interval, a public start).
- ``rsqrt``: without comparisons Newton ``y <- y (3 - x y^2) / 2`` from ``y0 = 1/sqrt(hi)``
  (217 rounds over SmolLM2's 1e9 range). With comparisons: 16 thresholds per octave (one
  batch of exact comparisons, 8 rounds) give ``y0`` within 1.1% and, as the same one-hot sum of
  constants, ``y0^2`` (18 more fraction bits); one Newton step ``y0 (3 - x y0^2) / 2`` in two
  product rounds (the /2 folded into the truncation): rel. err < 2e-4, 12 rounds. The norm
  multiplies ``x w sqrt(d)`` by ``y0`` in the round of ``x y0^2`` instead of forming ``1/sqrt``.
- ``sigmoid``: without comparisons ``e^{x/2} / (e^{x/2} + e^{-x/2})``, for x in [-16, 16]; SiLU =
  x sigmoid(x) (abs. err < 2e-3 on [-16, 16]); GELU(tanh) through ``0.5 (1 + tanh(z)) =
  sigmoid(2z)``, for x in [-4, 4] only. With comparisons: the clip's two comparisons and the
  sign ``s`` in one batch, ``t = e^{-min(|x|, 16)}`` (one exponential of a non-positive value),
  ``sigmoid = (1 - s (1 - t)) / (1 + t)`` (no cancellation for large negative x) with
  ``1/(1 + t)`` from a public start: abs. err < 3e-4 for any x, and ``times * sigmoid`` (SiLU:
  x, the gated MLP: gate * up riding in the round after the comparisons) in 17 rounds (121
  before the round cuts; 33 with two exponentials and a comparison-started reciprocal, whose
  14 comparisons per element were most of the protocol's traffic).
- ``softmax``: with ``Ranges.comparisons`` (what real models need), the exact row max (``ltz``:
  A2B of the two shares by a Kogge-Stone adder over XOR shares with boolean AND triples, then
  B2A by one Beaver product; exact), taken by groups of up to 32 keys that compare all their
  pairs in one batch, the winner's bits multiplied up to 8 at once (8 rounds for up to 17
  keys; a binary tournament needed 9 per halving),
  so exp only sees x - max <= 0 and the sum lies in [1, n]; ``(e @ V) / sum`` with ``e @ V``
  in the reciprocal's first round. Without comparisons: scores minus their row mean, which is
  safe only while the centred scores stay below ~6 and a row holds at most 64 keys. Masked
  keys (causal / sliding window) are multiplied by public 0/1 (and get -2000 for the max).
- with comparisons, the sigmoid's input is first clipped to [-16, 16] (two ReLUs in the same
  rounds, bounded comparisons: |x| < ~3900), so SiLU is accurate for any gate value (SmolLM2's
  reach 49).
- RoPE: the rotations of q (with 1/sqrt(D) folded in) and k share one round of truncations.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch

from . import beaver, poly, ring
from .poly import Poly, ring_int
from .void import VOID, real

FRAC_BITS = 20
_OFFSET = 1 << 62


# an opening's message: values by lane width, then the one-sided bits (Engine._open_with)
_OPEN_LAYOUT = [(w, "both") for w in (1, 16, 32, 64)] + [(1, "client"), (1, "server")]


def _msb(t: torch.Tensor) -> torch.Tensor:
    return t if t is VOID else torch.bitwise_right_shift(t, 63) & 1


def _lsr(t: torch.Tensor, k) -> torch.Tensor:
    """Logical shift right of int64 bits (as unsigned) by an int or a per-element tensor k >= 1."""
    if t is VOID:
        return t
    if isinstance(k, int):  # the common case: two tensor operations
        return torch.bitwise_right_shift(t, k) & ((1 << (64 - k)) - 1)
    mask = torch.bitwise_left_shift(torch.ones_like(k), 64 - k) - 1
    return torch.bitwise_right_shift(t, k) & mask


def _thresholds(lo: float, hi: float, per_octave: float) -> torch.Tensor:
    """Interval ends ``lo 2^(i/per_octave)`` up to ``hi`` (the last one is ``hi``); ``per_octave=0``:
    the one interval [lo, hi]. An interval start for Newton comes from one comparison per inner end."""
    rho = 2.0 ** (1 / per_octave) if per_octave else hi / lo
    m = max(1, math.ceil(math.log(hi / lo) / math.log(rho) - 1e-9))
    return torch.tensor([lo * rho ** i for i in range(m)] + [hi], dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _winner_factors(g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a group of g values compared by pairs ``(I[q], J[q]) = triu_indices(g, g, 1)[:, q]``:
    ``idx[i]``, the g - 1 pairs that involve i (those where i is first, then those where it is
    second), and ``beats[i]``, True where i's factor is ``1 - lt_q`` (i first: it wins ties)."""
    I, J = torch.triu_indices(g, g, 1)
    rows = [torch.cat([torch.nonzero(I == i).flatten(), torch.nonzero(J == i).flatten()]) for i in range(g)]
    return torch.stack(rows), torch.stack([I[r] == i for i, r in enumerate(rows)])


def _product(factors: list) -> Poly:
    """The product of shared values as one :class:`Poly` (multiplied out in one round)."""
    return functools.reduce(lambda a, b: a * b, [Poly.of(f) for f in factors])


@dataclasses.dataclass
class Shared:
    c: torch.Tensor  # client share (int64)
    s: torch.Tensor  # server share (int64)

    @property
    def shape(self):
        return real(self.c, self.s).shape

    def numel(self) -> int:
        return real(self.c, self.s).numel()

    def __add__(self, o: "Shared") -> "Shared":
        if not isinstance(o, Shared):  # a Poly: its __radd__
            return NotImplemented
        return Shared(self.c + o.c, self.s + o.s)

    def __sub__(self, o: "Shared") -> "Shared":
        if not isinstance(o, Shared):
            return NotImplemented
        return Shared(self.c - o.c, self.s - o.s)

    def __neg__(self) -> "Shared":
        return Shared(-self.c, -self.s)

    def map(self, fn) -> "Shared":
        """A local, share-wise linear rearrangement (view, transpose, slice, cat of one)."""
        return type(self)(VOID if self.c is VOID else fn(self.c), VOID if self.s is VOID else fn(self.s))

    def sum(self, dim, keepdim=False) -> "Shared":
        return Shared(self.c.sum(dim, keepdim=keepdim), self.s.sum(dim, keepdim=keepdim))


class ServerBit(Shared):
    """A bit the server holds in the clear (its share; the client's is a real 0): a truncation's
    wrap bit ``ms``, a comparison's ``bs``. With a provider whose dealer is the client
    (``TripleProvider.client_deals``), a polynomial opens it as it is, one bit, instead of masked:
    the client could unmask it anyway, and the server learns nothing new."""


class ClientBit(Shared):
    """A bit the client holds in the clear (its share; the server's is a real 0): a truncation's
    wrap bit ``mc``, a comparison's ``bc``. With the client as dealer, a polynomial masks it with
    a random bit ``a`` of the correlation (the client knows it) and the client alone sends
    ``mc XOR a``: one uniform bit instead of a masked ring element (poly.plan's ``xor``)."""


def cat(xs: list[Shared], dim: int) -> Shared:
    return Shared(torch.cat([x.c for x in xs], dim), torch.cat([x.s for x in xs], dim))


@dataclasses.dataclass
class LazySum:
    """``h + trunc(src, k)``: the residual stream plus a linear layer's output whose truncation
    (by the per-column ``k``) is left to the RMS norm that reads the sum, which opens its wrap bits
    in its own first round (:meth:`MPCExecutor.norm`). ``h`` None: the linear's output alone."""
    h: Shared | None
    src: Shared
    k: torch.Tensor

    def __add__(self, o: Shared) -> "LazySum":
        return LazySum(o if self.h is None else self.h + o, self.src, self.k)

    __radd__ = __add__

    def map(self, fn) -> "LazySum":
        """A slice of rows (tokens); ``k`` is per column."""
        return LazySum(None if self.h is None else self.h.map(fn), self.src.map(fn), self.k)


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A product's truncation by ``k`` left for the round that consumes it (:meth:`Engine.run`)."""
    k: int


@dataclasses.dataclass
class Stats:
    rounds: int = 0            # openings rounds (each a message each way)
    opened_elements: int = 0   # ring elements opened (each costs 8 bytes each way)
    shared_elements: int = 0   # ring elements re-shared by the client (client -> server)
    revealed_elements: int = 0  # ring elements revealed to the client (logits only)


class Engine:
    """The share arithmetic, as a two-party simulator or as one party of the networked protocol.

    ``transport=None``: the simulator, both shares in one process, openings counted as rounds.
    With a ``transport`` (``role`` "client" or "server"), this process is one party: of every
    :class:`Shared` only its own slot (``c`` for the client, ``s`` for the server) is real; the
    other slot is :data:`void.VOID`, on which every operation is free (protocols/void.py: the
    party computes its own half only; a real zero in the other slot would double its CPU). That
    is sound because every local operation is slot-wise (each slot is computed from the same
    slot of its inputs and from public values; where a party's private bit becomes a sharing,
    the other party's share is a real 0 in *its* slot), and the
    only cross-slot points -- :meth:`share`, :meth:`open`, :meth:`reveal`, :meth:`reshare` and
    the triple provider -- go through the transport and read or send only this party's slot.
    The engine is synchronous: each exchange suspends it (party/sync_driver.py) until the
    session's trio task has the peer's reply.
    """

    def __init__(self, provider: beaver.TripleProvider | None = None, frac_bits: int = FRAC_BITS,
                 record: bool = False, transport=None):
        self.transport = transport
        self.role = None if transport is None else transport.role
        if provider is None and transport is not None:
            raise ValueError("a party engine needs a provider whose triples both parties agree on")
        self.provider = provider or beaver.DealerProvider()
        self.f = frac_bits
        self.prg = ring.MaskPRG()
        self.stats = Stats()
        # record=True keeps every opened value and every share the client sent: the server's view
        self.view: list[torch.Tensor] | None = [] if record else None
        # range treatment by secure comparison (needs boolean triples: dealer or OT provider)
        self.clip_sigmoid = False
        self.rsqrt_guess = False  # rsqrt's start from a batch of comparisons (fewer rounds)
        self.exact_max = False
        # local_trunc=True: SecureML local truncation (no round, fails with prob |v| 2^(2F-63))
        self.local_trunc = False

    # -- encoding, sharing, opening ---------------------------------------------------------
    def encode(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        return torch.round(x.to(torch.float64) * 2.0 ** (self.f if bits is None else bits)).to(torch.int64)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64) / 2.0 ** self.f

    def _mine(self, x: Shared) -> torch.Tensor:
        return x.s if self.role == "server" else x.c

    def share(self, x: torch.Tensor | None = None, shape: tuple | None = None) -> Shared:
        """The client's input: its share is a fresh mask r, the server receives enc(x) - r.
        (The server, which has no ``x``, passes the public ``shape``.)"""
        if self.role == "server":
            sent = self.transport.from_client("input", shape)
            self.stats.shared_elements += sent.numel()
            return Shared(VOID, sent)
        r = self.prg.ring(*x.shape)
        self.stats.shared_elements += x.numel()
        sent = self.encode(x) - r
        if self.view is not None:
            self.view.append(sent.clone())
        if self.role == "client":
            self.transport.to_server("input", sent)
            return Shared(r, VOID)
        return Shared(r, sent)

    def reshare(self, x: Shared, r: torch.Tensor | None) -> Shared:
        """Move the client's share into its preprocessed mask ``r`` (one message client -> server):
        afterwards the client holds ``r`` and the server ``x - r``, the form a linear layer wants
        (the client's product ``W r`` comes from the mask material). The server passes ``r=None``."""
        self.stats.shared_elements += x.numel()
        if self.role == "server":
            return Shared(x.c, x.s + self.transport.from_client("reshare", tuple(x.shape)))
        sent = x.c - r
        if self.view is not None:
            self.view.append(sent.clone())
        if self.role == "client":
            self.transport.to_server("reshare", sent)
        return Shared(r, x.s + sent)

    def reveal(self, x: Shared) -> torch.Tensor | None:
        """The server sends its share to the client (only for the logits); the server gets None."""
        self.stats.revealed_elements += x.numel()
        if self.role == "server":
            self.transport.to_client(x.s)
            return None
        other = x.s if self.role is None else self.transport.from_server(tuple(x.shape))
        return self.decode(x.c + other)

    def open(self, xs: list[Shared], bits: int | list[int] = 64) -> list[torch.Tensor]:
        """One round: every value in ``xs`` opened to both parties (``bits``: see :meth:`_open_with`)."""
        return self._open_with(xs, torch.add, bits)

    def _open_with(self, xs: list[Shared], combine, bits: int | list[int] = 64,
                   sender: list[str] | None = None) -> list[torch.Tensor]:
        """One round: each party sends its slot of every value in one message (arithmetic shares
        with ``combine=add``, XOR shares with ``bitwise_xor``). ``bits`` (for all values, or one per
        value): only the low ``bits`` bits of an opened value are ever read (the rest of it is then
        garbage), and only they travel, packed 4 (or 2, or 64 one-bit values) to a ring element
        (ring.pack_low). ``sender``: per value "both" (default), or the one party whose slot is the
        whole value (the other's is 0 and not sent): "server" for a :class:`ServerBit` opened as it
        is (the server's own: not part of the server's view), "client" for an XOR-masked
        :class:`ClientBit`."""
        self.stats.rounds += 1
        if self.transport is None:
            self.stats.opened_elements += sum(x.numel() for x in xs)
            out = [combine(x.c, x.s) for x in xs]
        else:
            mine = [x.s for x in xs] if self.role == "server" else [x.c for x in xs]
            sizes = [m.numel() for m in mine]
            self.stats.opened_elements += sum(sizes)
            if sender is None and isinstance(bits, int):  # one group (the AND rounds)
                groups = [(ring.lane_bits(bits), "both", range(len(xs)))]
            else:
                # by lane width, then the one-sided bits: the layout follows from the public plan,
                # the same on both sides
                at_key: dict[tuple, list[int]] = {}
                for i, key in enumerate(zip((ring.lane_bits(b) for b in ([bits] * len(xs) if isinstance(bits, int) else bits)),
                                            sender or ["both"] * len(xs))):
                    at_key.setdefault(key, []).append(i)
                groups = [(w, who, at_key[(w, who)]) for w, who in _OPEN_LAYOUT if (w, who) in at_key]
            flats = [torch.cat([mine[i].reshape(-1) for i in idx]) if len(idx) > 1 else mine[idx[0]].reshape(-1)
                     for _, _, idx in groups]
            sent = [ring.pack_low(f, w) for (w, who, _), f in zip(groups, flats) if who in ("both", self.role)]
            got = self.transport.exchange(torch.cat(sent) if len(sent) > 1 else sent[0] if sent else
                                          torch.zeros(0, dtype=torch.int64),
                                          sum(-(-f.numel() * w // 64) for (w, who, _), f in zip(groups, flats) if who != self.role))
            # combined a group at a time (the slot of a one-sided value's other party is 0), then split
            out, at = [None] * len(xs), 0
            for (w, who, idx), flat in zip(groups, flats):
                if who != self.role:
                    words = -(-flat.numel() * w // 64)
                    flat, at = combine(flat, ring.unpack_low(got[at:at + words], flat.numel(), w)), at + words
                parts = flat.split([sizes[i] for i in idx]) if len(idx) > 1 else (flat,)
                for i, part in zip(idx, parts):
                    out[i] = part.view(mine[i].shape)
        if self.view is not None:  # what the server receives: a client-sent bit travels packed, 64 to a word
            self.view += [ring.pack_low(o.reshape(-1), 1) if who == "client" else o.clone()
                          for o, who in zip(out, sender or ["both"] * len(out)) if who != "server"]
        return out

    # -- local operations ---------------------------------------------------------------------
    def trunc(self, x: Shared, k: int | torch.Tensor) -> Shared:
        return self.trunc_many([(x, k)])[0]

    def trunc_many(self, items: list[tuple[Shared, int | torch.Tensor]]) -> list[Shared]:
        """Truncation by ``k`` bits, exact up to one unit in the last place for ``|x| < 2^62``,
        all items in one round (see the module docstring: local shifts plus the wrap bit)."""
        if self.local_trunc:
            return [Shared(torch.bitwise_right_shift(x.c, k), -torch.bitwise_right_shift(-x.s, k)) for x, k in items]
        return self.run([("trunc", x, k) for x, k in items]) if items else []

    def lazy_trunc(self, x: Shared, k: int | torch.Tensor) -> Poly:
        """The truncation of ``x`` by ``k`` as a polynomial whose one product (the wrap bit's) is not
        yet done: ``L - 2^(64-k) (mc + ms - mc ms)`` (module docstring). Forcing it is one round; a
        product that takes it as a factor does that product in its own round (protocols/poly.py)."""
        if not isinstance(k, int):
            k = torch.as_tensor(k, dtype=torch.int64)
            if k.dim() == 0:
                k = int(k)
        # the client adds 2^62: the value is now in [0, 2^63) (a party engine on the server adds it to
        # its don't-care c slot only)
        uc = x.c + _OFFSET
        us = x.s
        mc, ms = _msb(uc), _msb(us)
        zero = torch.zeros_like(real(mc, ms))  # a real 0: the other party's share of its own bit
        if isinstance(k, int):
            top, off = ring_int(1 << (64 - k)), 1 << (62 - k)
        else:
            top = torch.bitwise_left_shift(torch.ones_like(k), 64 - k)
            off = torch.bitwise_left_shift(torch.ones_like(k), 62 - k)
        L = Shared(_lsr(uc, k) - off, _lsr(us, k))
        # wrap bit w = mc OR ms = mc + ms - mc ms (known MSB 0 of the offset value)
        return Poly([L, ClientBit(mc, zero), ServerBit(zero.clone(), ms)],
                    {(0,): 1, (1,): -top, (2,): -top, (1, 2): top}, source=(x, k))

    def add_public(self, x: Shared | Poly, v: torch.Tensor | float) -> Shared | Poly:
        v = self.encode(torch.as_tensor(v))
        if isinstance(x, Poly):
            return x.add_public(v)
        return Shared(x.c + v, x.s.clone() if v.dim() == 0 else x.s + torch.zeros_like(v))

    def mul_public(self, x: Shared, v: torch.Tensor | float, bits: int | None = None) -> Shared:
        """``x * v`` for a public real ``v`` (encoded with ``bits``, default F), truncated back."""
        bits = self.f if bits is None else bits
        e = self.encode(torch.as_tensor(v), bits)
        return self.trunc(Shared(x.c * e, x.s * e), bits)

    def mul_int(self, x: Shared, v: torch.Tensor | int) -> Shared:
        """``x * v`` for a public integer (e.g. a 0/1 mask): exact, no truncation."""
        v = torch.as_tensor(v, dtype=torch.int64)
        if isinstance(x, Poly):
            return x.scale(v if v.dim() else int(v))
        return Shared(x.c * v, x.s * v)

    def ring_matmul(self, W: ring.RingMatrix, x: Shared) -> Shared:
        """The simulator's linear layer: ``W x`` share by share (the protocol's ``W (x - r)`` and
        ``W r``, the same sum)."""
        return Shared(W.matmul(x.c), W.matmul(x.s))

    # -- Beaver products ------------------------------------------------------------------------
    def mul_many(self, pairs: list[tuple[Shared, Shared]], truncate: bool = True) -> list[Shared]:
        """All products in one round of openings (and their truncations in one more)."""
        return self.run([("mul", x, y, self.f if truncate else None) for x, y in pairs])

    def matmul_many(self, pairs: list[tuple[Shared, Shared]], truncate: bool = True) -> list[Shared]:
        return self.run([("matmul", x, y, self.f if truncate else None) for x, y in pairs])

    def run(self, items: list[tuple]) -> list[Shared | Poly]:
        """One round of openings for every item, then one round of truncations for the products
        that ask for one. Items:

        - ``("mul" | "matmul", x, y, bits[, v])``: the Beaver product ``x * y`` (``x @ y``), times
          the public integer ``v`` if given, then truncated by ``bits`` (an int, a per-element
          tensor, or None for no truncation; ``Lazy(k)``: no round for it, the result is the
          :class:`Poly` of its truncation, which a later product takes as a factor, its wrap
          bits opened in that product's round, or a ``force`` item truncates). ``bits = F + s``
          folds a public division by ``2^s`` into the truncation; ``v = round(c 2^b)`` with
          ``bits = F + b`` a public factor ``c`` (the caller keeps ``|x y v| < 2^(62 - F)`` at
          scale 2^F). An elementwise product's factors may be :class:`Poly` (a lazy truncation,
          an affine function of one): the whole polynomial is multiplied out in this round.
        - ``("trunc", x, k)``: a truncation (of a lazy truncation: from its untruncated value).
        - ``("force", p[, bits[, v]])``: the value of the :class:`Poly` ``p`` (e.g. a lazy
          truncation, or a product of three factors: ``x^3``), times ``v`` and truncated by
          ``bits`` as for a product.
        """
        beav, fins, polys = [], [], []
        for it in items:
            kind, x = it[0], it[1]
            if kind == "trunc" and self.local_trunc:
                fins.append(("done", self.trunc_many([it[1:]])[0]))
                continue
            if kind == "trunc":
                k = it[2]
                if isinstance(x, Poly):  # truncate the untruncated value once, by both shifts
                    if x.source is None:
                        raise TypeError("trunc of a polynomial that is not a truncation: force it first")
                    x, k = x.source[0], x.source[1] + k
                polys.append(self.lazy_trunc(x, k))
                fins.append(("poly", len(polys) - 1, None, None))
            elif kind == "force":
                polys.append(x)
                fins.append(("poly", len(polys) - 1, it[2] if len(it) > 2 else None, it[3] if len(it) > 3 else None))
            elif kind == "mul" and (isinstance(x, Poly) or isinstance(it[2], Poly)):
                px = Poly.of(x)
                py = px if it[2] is x else Poly.of(it[2])
                polys.append(px * py)
                fins.append(("poly", len(polys) - 1, it[3], it[4] if len(it) > 4 else None))
            else:
                beav.append(it[:3])
                fins.append(("prod", len(beav) - 1, it[3], it[4] if len(it) > 4 else None))
        groups: dict[tuple, list[int]] = {}  # polys of one shape share their variables' masks
        for i, p in enumerate(polys):
            groups.setdefault(tuple(p.shape), []).append(i)
        res = self._products(beav + [("poly", [polys[i] for i in g]) for g in groups.values()]) if beav or polys else []
        done = {i: z for g, zs in zip(groups.values(), res[len(beav):]) for i, z in zip(g, zs)}
        out, later = [], []
        for i, fin in enumerate(fins):
            if fin[0] == "done":
                out.append(fin[1])
                continue
            z = res[fin[1]] if fin[0] == "prod" else done[fin[1]]
            if fin[3] is not None:
                z = self.mul_int(z, fin[3])
            if isinstance(fin[2], Lazy):
                z = self.lazy_trunc(z, fin[2].k)
            elif fin[2] is not None:
                later.append(i)
            out.append(z)
        if later:
            done = self.trunc_many([(out[i], fins[i][2]) for i in later])
            for i, z in zip(later, done):
                out[i] = z
        return out

    def force(self, p: Poly) -> Shared:
        return self.run([("force", p)])[0]

    def _products(self, items: list[tuple]) -> list:
        """One round of openings for all items: untruncated Beaver products ``("mul" | "matmul", x, y)``
        (a :class:`Shared` each) and polynomial groups ``("poly", polys)`` (a list each)."""
        plans, masked, bits, sender = [], [], [], []
        for it in items:
            if it[0] == "poly":
                pl = poly.plan(it[1], self._shown, self._xor)
                n = pl.n_masked
                corr = self.provider.poly(pl.vars[0].shape, n, pl.subsets, pl.bit_slots).take() if n else None
                for j, i in enumerate(pl.opened[:n]):
                    v = pl.vars[i]
                    if j in pl.bit_slots:  # the client's own bit XOR its mask bit: the client sends it
                        masked.append(Shared(VOID if v.c is VOID else v.c ^ corr.bits[j], v.s))
                        sender.append("client")
                    else:
                        masked.append(v - Shared(*corr.masks[j]))
                        sender.append("both")
                masked += [pl.vars[i] for i in pl.opened[n:]]  # the server's own bits, as they are
                sender += ["server"] * (len(pl.opened) - n)
                bits += pl.need
                plans.append((pl, corr))
            else:
                kind, x, y = it
                t = self.provider.mul(x.shape).take() if kind == "mul" else self.provider.matmul(x.shape, y.shape).take()
                masked += [Shared(x.c - t.a[0], x.s - t.a[1]), Shared(y.c - t.b[0], y.s - t.b[1])]
                sender += ["both", "both"]
                bits += [64, 64]
                plans.append(t)
        d = self._open_with(masked, torch.add, bits, sender) if masked else []
        out, at = [], 0
        for it, pl in zip(items, plans):
            if it[0] == "poly":
                pl, corr = pl
                out.append(self._poly_values(pl, corr, d[at:at + len(pl.opened)]))
                at += len(pl.opened)
            else:
                out.append(Shared(*beaver.beaver_combine(it[0], pl, d[at], d[at + 1])))
                at += 2
        return out

    def _shown(self, v) -> bool:
        """With the client as dealer a :class:`ServerBit` is opened as it is (poly.plan's ``shown``)."""
        return self.provider.client_deals and isinstance(v, ServerBit)

    def _xor(self, v) -> bool:
        """With the client as dealer a :class:`ClientBit` is opened XOR-masked (poly.plan's ``xor``)."""
        return self.provider.client_deals and isinstance(v, ClientBit)

    def _poly_values(self, pl: poly.Plan, corr, d) -> list[Shared]:
        """Shares of each ``sum coef monomial`` of one round's group from the opened ``d``
        (poly.shares), for each slot this engine computes (a party its own only); the public
        terms go into the client's share."""
        vars, terms, opened = pl.vars, pl.terms, pl.opened
        slot = {i: j for j, i in enumerate(opened)}
        sides = []
        for side in (0, 1):
            if self.role == ("server", "client")[side]:  # the other party's slot
                sides.append([VOID] * len(terms))
                continue
            sides.append(poly.shares(terms, slot, d, [(v.c, v.s)[side] for v in vars],
                                     corr.blocks[side] if corr else None, public=side == 0,
                                     n_masked=pl.n_masked, bit_slots=pl.bit_slots, subsets=pl.subsets))
        return [Shared(c, s_) for c, s_ in zip(*sides)]

    def mul(self, x: Shared, y: Shared) -> Shared:
        return self.mul_many([(x, y)])[0]

    def square(self, x: Shared) -> Shared:
        return self.mul(x, x)

    # -- comparison: A2B by a Kogge-Stone adder on XOR shares, MSB, B2A ---------------------------
    def _and_many(self, pairs: list[tuple[Shared, Shared]], bits: int = 64) -> list[Shared]:
        """Bitwise AND of XOR-shared int64 words, all in one round (``bits``: of the low bits only;
        the upper bits of the results are garbage)."""
        if len(pairs) > 1:  # one triple for all: flat and side by side, split afterwards
            x, y = (cat([p[j].map(lambda t: t.reshape(-1)) for p in pairs], 0) for j in (0, 1))
            (z,) = self._and_many([(x, y)], bits)
            at = list(itertools.accumulate((x_.numel() for x_, _ in pairs), initial=0))
            return [z.map(lambda t, a=a, b=b, s=x_.shape: t[a:b].view(s))
                    for a, b, (x_, _) in zip(at, at[1:], pairs)]
        ((x, y),) = pairs
        t = self.provider.and_(x.shape).take()
        e, d = self._open_with([Shared(x.c ^ t.a[0], x.s ^ t.a[1]), Shared(y.c ^ t.b[0], y.s ^ t.b[1])],
                               torch.bitwise_xor, bits)
        return [Shared(t.c[0] ^ (e & t.b[0]) ^ (d & t.a[0]) ^ (e & d), t.c[1] ^ (e & t.b[1]) ^ (d & t.a[1]))]

    def ltz(self, x: Shared, bound: float | None = None, slack: float | None = None,
            also: list[tuple] = (), lazy: bool = False, scale: int | torch.Tensor = 0) -> Shared | Poly | tuple[Shared, list[Shared]]:
        """Arithmetic shares of the bit ``x < 0``: AND rounds for a carry (Kogge-Stone over the two
        shares as XOR-shared addends), then one Beaver product to turn the XOR-shared bit into an
        additive one (``also``: single-round items of :meth:`run` riding in that round; then the
        result is ``(bit, their outputs)``). ``lazy``: no round for that product; the bit comes as
        the :class:`Poly` ``1 - bc - bs + 2 bc bs``, multiplied out in the round of the product
        that uses it.

        Default: the MSB of ``x_c + x_s``, exact, 7 AND rounds (8 in all). With a public ``bound``
        (|x| < bound) and ``slack``: the client adds ``2^B >= (bound + slack) 2^F``, both parties
        drop the low ``k`` bits of their share (``2^(k+1) <= slack 2^F``), and the bit is bit
        ``p = B - k`` of the sum of the shifted shares: the carry runs over ``p`` bits only,
        ``1 + ceil(log2 p)`` AND rounds (5 for p <= 16 instead of 7). Exact for x < 0; for
        ``0 <= x < slack`` it may also say 1 (the carry lost by the shift), never worse. ``scale``:
        x comes with that many more fraction bits (an untruncated product; ``bound`` and ``slack``
        stay in real units); a tensor: per element (with ``bound`` and ``slack``: B and k move
        with it, p does not), e.g. a linear layer's untruncated output with its per-column shifts."""
        zero = torch.zeros_like(real(x.c, x.s))  # a real 0: the other party's share of its own bit
        F = self.f + scale  # an int, or a tensor (per element): B and k move with it, p does not
        per_element = isinstance(scale, torch.Tensor)
        if per_element and not (bound and slack):
            raise ValueError("ltz: a per-element scale needs a bound and a slack")
        if bound is None:
            B, k = 63, 0
        elif not slack:  # exact: no bits dropped
            B, k = F + max(1, math.ceil(math.log2(bound))), 0
        else:  # drop k bits, 2^(k+1) <= slack 2^F
            B, k = F + max(1, math.ceil(math.log2(bound + slack))), F + math.floor(math.log2(slack)) - 1
            if not per_element:
                k = max(0, min(B - 1, k))
            if int(torch.as_tensor(B).max()) > 63 or int(torch.as_tensor(k).min()) < 0:
                raise ValueError(f"ltz bound {bound} too large for the ring")
        p = int(torch.as_tensor(B - k).max())
        off = torch.bitwise_left_shift(torch.ones_like(torch.as_tensor(B)), B)  # 2^63 wraps to -2^63
        xc = _lsr(x.c + off, k) if per_element or k else x.c + off
        xs = _lsr(x.s, k) if per_element or k else x.s
        bc, bs = self._sum_bit(xc, xs, p)
        return self._b2a(bc, bs, zero, also, lazy)

    def _b2a(self, bc, bs, zero, also, lazy):
        """:meth:`ltz`'s last step: ``1 - (bc XOR bs)`` as an additive sharing (or its Poly)."""
        # the bit [x >= 0] is bc XOR bs = bc + bs - 2 bc bs (bc bs by one Beaver product), ltz = 1 - it
        if lazy:
            if also:
                raise ValueError("a lazy comparison has no round of its own for 'also' items")
            return Poly([ClientBit(bc, zero), ServerBit(zero.clone(), bs)], {(): 1, (0,): -1, (1,): -1, (0, 1): 2})
        prod, *rest = self.run([("mul", Shared(bc, zero), Shared(zero.clone(), bs), None)] + list(also))
        bit = Shared(1 - bc + 2 * prod.c, -bs + 2 * prod.s)
        return (bit, rest) if also else bit

    def _sum_bit(self, xc: torch.Tensor, xs: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """XOR shares (client's, server's) of bit ``p`` of ``xc + xs`` (mod 2^64), each party holding
        its own addend: a Kogge-Stone carry over the low ``p`` bits, 1 + ceil(log2 p) AND rounds."""
        zero = torch.zeros_like(real(xc, xs))
        X, Y = Shared(xc, zero), Shared(zero, xs)  # each party's share as an XOR-shared addend
        # only bits below p matter (every step is bitwise or shifts left): openings carry those alone
        (G,) = self._and_many([(X, Y)], p)
        P = Shared(X.c ^ Y.c, X.s ^ Y.s)
        P0 = P
        levels = max(0, math.ceil(math.log2(p))) if p > 1 else 0
        for lv in range(levels):
            sh = 1 << lv
            Gs = G.map(lambda t: torch.bitwise_left_shift(t, sh))
            Ps = P.map(lambda t: torch.bitwise_left_shift(t, sh))
            if lv < levels - 1:
                pg, pp = self._and_many([(P, Gs), (P, Ps)], p)
                P = pp
            else:
                (pg,) = self._and_many([(P, Gs)], p)
            G = Shared(G.c ^ pg.c, G.s ^ pg.s)  # G and P & G<<k are disjoint: OR = XOR
        top = Shared(P0.c ^ torch.bitwise_left_shift(G.c, 1), P0.s ^ torch.bitwise_left_shift(G.s, 1))
        return torch.bitwise_right_shift(top.c, p) & 1, torch.bitwise_right_shift(top.s, p) & 1

    def mul_bit(self, x: Shared, bit: Shared) -> Shared:
        (z,) = self.mul_many([(x, bit)], truncate=False)
        return z

    def relu(self, x: Shared, bound: float | None = None, slack: float | None = None,
             also: list[tuple] = ()) -> Shared | tuple[Shared, list[Shared]]:
        """``max(x, 0)``: the comparison (``bound``, ``slack`` as in :meth:`ltz`; with them relu
        may also return 0 for ``0 <= x < slack``), then one product by the bit (its XOR-to-additive
        step in the same round), in whose round the single-round items ``also`` ride (the result
        is then ``(relu, their outputs)``)."""
        neg = self.ltz(x, bound, slack, lazy=True)
        z, *rest = self.run([("mul", x, neg, None)] + list(also))
        return (x - z, rest) if also else x - z

    # comparisons of values known to lie within +-CMP_BOUND (activations, score differences): 5 AND
    # rounds instead of 7, at the price of reading 0 <= x < CMP_SLACK as negative (see ltz)
    CMP_BOUND, CMP_SLACK = 4000.0, 1 / 8
    # the max's winner indicator: at most this many shared bits multiplied in one round (2^8 mask
    # products per element, 2^9 with the value it selects)
    _MAX_FACTORS = 8
    _DIV_BITS = 32  # x / N for a public integer N as x round(2^32 / N) / 2^32 (|x| < CMP_BOUND: below 2^57)

    def clip(self, x: Shared, lo: float, hi: float, bounded: bool = False,
             also: list[tuple] = ()) -> Shared | tuple[Shared, list[Shared]]:
        """``min(max(x, lo), hi)``: both comparisons in the same rounds. ``bounded``: x is known to
        lie within +-``CMP_BOUND`` - max(|lo|, |hi|) (shorter comparisons; the clip may then let
        through up to ``hi + CMP_SLACK`` and ``lo - CMP_SLACK``)."""
        n = x.numel()
        both = cat([self.add_public(x, -hi).map(lambda t: t.reshape(-1)),
                    self.add_public(-x, lo).map(lambda t: t.reshape(-1))], 0)
        kw = dict(bound=self.CMP_BOUND, slack=self.CMP_SLACK) if bounded else {}
        r, rest = self.relu(both, also=also, **kw) if also else (self.relu(both, **kw), [])
        over, under = r.map(lambda t: t[:n].reshape(x.shape)), r.map(lambda t: t[n:].reshape(x.shape))
        y = x - over + under
        return (y, rest) if also else y

    def max_last(self, x: Shared, bounded: bool = False) -> Shared:
        """Max over the last dim. ``bounded=False``: a tournament of ceil(log2 n) comparison layers
        (9 rounds each). ``bounded=True`` (every pairwise difference within +-``CMP_BOUND``): groups of
        up to 32 values (8 while more than 32 remain) compare all their pairs in one batch (exact
        bounded comparisons, 7 rounds), the winner's indicator is the product of its g - 1 bits
        (by pairs in the comparisons' last round, then up to ``_MAX_FACTORS`` at once) and the
        group max ``sum_i w_i x_i`` one product of x and all those factors: 8 rounds for n <= 17
        (9 up to 33), instead of 7-9 per halving. Exact (ties go to the first index)."""
        if not bounded:
            while x.shape[-1] > 1:
                n = x.shape[-1]
                if n % 2:
                    x = cat([x, x.map(lambda t: t[..., -1:])], -1)
                    n += 1
                a, b = x.map(lambda t: t[..., 0:n:2]), x.map(lambda t: t[..., 1:n:2])
                x = b + self.relu(a - b)
            return x
        return self.max_last_scaled(x, 0)[0]

    def max_last_scaled(self, x: Shared, shift: int, mult: int = 1) -> tuple[Shared, Shared, Shared]:
        """:meth:`max_last` (bounded) of x, and also ``x mult / 2^shift`` and the same element of it
        (``m mult / 2^shift`` up to one ulp): ``x mult / 2^shift`` is truncated in the first
        comparisons' last round and carried through the selections, so ``(x - m) mult / 2^shift``
        costs no round (``|x mult| < 2^(62 - F)``)."""
        xs = None
        scaled = self.mul_int(x, mult) if mult != 1 else x
        while x.shape[-1] > 1:
            n = x.shape[-1]
            g = n if n <= 32 else 8
            if n % g:  # pad with copies of the last value (a copy never changes the max)
                pad = g - n % g
                x = cat([x, x.map(lambda t: t[..., -1:].expand(*t.shape[:-1], pad))], -1)
                if xs is not None:
                    xs = cat([xs, xs.map(lambda t: t[..., -1:].expand(*t.shape[:-1], pad))], -1)
                else:
                    scaled = cat([scaled, scaled.map(lambda t: t[..., -1:].expand(*t.shape[:-1], pad))], -1)
            grp = (lambda t: t.reshape(*t.shape[:-1], t.shape[-1] // g, g))
            x, xs, full = self._max_groups(x.map(grp), None if xs is None else xs.map(grp), shift,
                                           scaled.map(grp) if xs is None else None)
            if full is not None:
                x_shifted = full.map(lambda t: t[..., :n])
        if xs is None:  # a single key: nothing compared
            xs = x_shifted = self.trunc(scaled, shift) if shift else scaled
        return x, xs, x_shifted

    def _max_groups(self, x: Shared, xs: Shared | None = None, shift: int = 0, scaled: Shared | None = None):
        """(..., G, g) -> (..., G): each group's max, exactly (see :meth:`max_last`), and the same
        selection of ``xs`` (``scaled / 2^shift``, scaled = x times a public integer; truncated here
        when xs is None, and then returned whole too)."""
        g = x.shape[-1]
        if g == 1:
            return x.map(lambda t: t[..., 0]), (xs or x).map(lambda t: t[..., 0]), None
        I, J = torch.triu_indices(g, g, 1)
        diff = x.map(lambda t: t[..., I] - t[..., J])
        lt = self.ltz(diff, bound=self.CMP_BOUND, lazy=True)  # [x_i < x_j], i < j
        # factors of w_i: [i beats j] = 1 - lt_ij for j > i, lt_ji for j < i (one gather):
        # beats + (1 - 2 beats) lt, still lazy (the comparisons' last step rides in the first products)
        idx, beats = _winner_factors(g)
        b = beats.to(torch.int64)
        w = lt.map(lambda t: t[..., idx]).scale(1 - 2 * b).add_public(b)  # (..., g, g - 1)
        ride = [("trunc", x if scaled is None else scaled, shift)] if xs is None else []  # in the first round of products
        # round 1: the lazy bits by pairs (their XOR-to-additive steps ride here), an odd one forced
        f, h = g - 1, (g - 1) // 2
        items = [("mul", w.map(lambda t: t[..., 0:2 * h:2]), w.map(lambda t: t[..., 1:2 * h:2]), None)] if h else []
        if f % 2:
            items.append(("force", w.map(lambda t: t[..., f - 1:])))
        *parts, xs = self.run(items + ride) if ride else self.run(items) + [xs]
        full = xs.map(lambda t: t.reshape(*t.shape[:-2], -1)) if ride else None
        w = cat(parts, -1) if len(parts) > 1 else parts[0]
        # then up to _MAX_FACTORS factors at once (a product of r shared factors is one round with
        # 2^r mask products per element), and the last round: x and xs times the product of all
        while w.shape[-1] > self._MAX_FACTORS:
            r = w.shape[-1]
            q = -(-r // -(-r // self._MAX_FACTORS))  # factors per product, as even as possible
            w = cat(self.run([("force", _product([w.map(lambda t, j=j: t[..., j:j + 1]) for j in range(a, min(a + q, r))]))
                              for a in range(0, r, q)]), -1)
        W = _product([w.map(lambda t, j=j: t[..., j]) for j in range(w.shape[-1])])
        z, zs = self.run([("force", W * Poly.of(x)), ("force", W * Poly.of(xs))])
        return z.sum(-1), zs.sum(-1), full

    # -- nonlinear functions --------------------------------------------------------------------
    def exp(self, x: Shared, n: int = 8, pre: int = 0, deg: int = 4, also: list[tuple] = (),
            given_u: bool = False, post: int = 0, lazy: bool = False, cubes: int = 0) -> Shared | Poly | tuple:
        """``exp(x / 2^pre)`` as ``(p(u))^(2^n)``, ``u = x / 2^(n + pre)`` (a truncation forced in
        the round of u^2, in which the single-round items ``also`` ride; ``given_u``: x is u
        already), p the Taylor polynomial of degree ``deg`` (4 or 6) with its coefficients folded
        into the products' truncations (u^2/2; u^3/6 and u^4/24 side by side; for deg 6 then
        u^5/120 and u^6/720; the terms beyond u^2/2 are summed untruncated and truncated once). Each
        product's truncation rides in the next product's round (lazy truncations, protocols/poly.py):
        3 + n rounds (deg 6: 4 + n), the last truncation included;
        ``lazy``: the result is that last truncation's :class:`Poly` (one round less).
        ``cubes`` (with ``given_u``, u = x / (3^cubes 2^n) <= 0): that many cubings before the n
        squarings, one round each (a product of three factors: y^3 <= 1 at scale 2^3F stays below
        2^62), so N = 3^cubes 2^n takes cubes + n rounds instead of log2(N).

        Relative error ~ N |u|^(deg+1) / (deg+1)! (N = 3^cubes 2^n): deg 4, n = 8 (the default):
        < 2e-3 on [-12, 8]; deg 4, N = 162 (softmax, x <= 0.5): < 1e-3 on [-12, 0.5] with the
        truncations (on [-4, 0] 9.2e-4 measured; 7.8e-4 with n = 7 squarings). p(u) < 1 only
        for u in (-2.78, 0) (deg 4; deg 6: (-3.6, 0)): below ``-2.78 N`` (N = 162: -450, n = 8:
        -712) the result grows again and soon overflows the ring. The sigmoid's deg 6, n = 3 on [-16, 0]
        is within 2e-6 relative down to -4, and within 1e-6 absolute below."""
        if deg not in (4, 6):
            raise ValueError("exp: deg 4 or 6")
        if given_u:  # the caller computed u = x / 2^(n+pre) itself; ``also`` rides in the u^2 round
            u = x
            if isinstance(u, Poly):  # u's value too, out of the same round
                h2, u, *rest = self.run([("mul", u, u, Lazy(self.f + 1)), ("force", u)] + list(also))
            else:
                h2, *rest = self.run([("mul", u, u, Lazy(self.f + 1))] + list(also))
        else:  # u = x / 2^(n+pre), its value out of the round of u^2 / 2
            lu = self.lazy_trunc(x, n + pre)
            h2, u, *rest = self.run([("mul", lu, lu, Lazy(self.f + 1)), ("force", lu)] + list(also))

        def c(v):
            return self.encode(torch.tensor(v), 16)
        # u^3/6 and u^4/24 untruncated (one scale), with h2's truncation in their round and h2 itself;
        # deg 6: u^4/24 lazy too, a factor of u^5/120 and u^6/720 in the next round
        f16 = self.f + 16
        z3, z4, h2 = self.run([("mul", h2, u, None, c(1 / 3)), ("mul", h2, h2, None if deg == 4 else Lazy(f16), c(1 / 6)),
                               ("force", h2)])
        if deg == 4:
            high, y = z3 + z4, u + h2
        else:
            z5, z6, z4 = self.run([("mul", z4, u, None, c(1 / 5)), ("mul", z4, h2, None, c(1 / 15)), ("force", z4)])
            high, y = z3 + z5 + z6, u + h2 + z4
        # the untruncated terms summed and truncated once, lazily: it rides in the first squaring's round
        y = self.add_public(self.lazy_trunc(high, f16) + y, 1.0)  # 1 + u + u^2/2 + u^3/6 + u^4/24 (+ u^5/120 + u^6/720)
        for i in range(cubes):
            py = Poly.of(y)
            (y,) = self.run([("force", py * py * py, Lazy(2 * self.f + (post if i == cubes + n - 1 else 0)))])
        for i in range(n):  # ``post``: the last squaring also divides by 2^post (negative: keeps -post more bits)
            (y,) = self.run([("mul", y, y, Lazy(self.f + (post if i == n - 1 else 0)))])
        if not lazy:
            y = self.force(y)
        return (y, rest) if also else y

    @staticmethod
    def _minus_each(x: Shared, t: torch.Tensor) -> Shared:
        """``x - t_i`` for each public ring value ``t_i``, flat and threshold-major (one comparison batch)."""
        n = t.numel()
        return Shared((x.c.reshape(1, -1) - t.view(-1, 1)).reshape(-1), x.s.reshape(1, -1).expand(n, -1).reshape(-1))

    @staticmethod
    def _interval_const(bits: Shared, consts: torch.Tensor, shape, base: Shared | None = None) -> Shared:
        """The public constant ``c_j`` of x's interval j (of m) from the bits ``b_i = [x < t_i]``,
        i = 1..m-1, threshold-major: ``c_m + sum_i b_i (c_i - c_(i+1))``, local. With ``base`` (= c_m x)
        and the products ``x b_i`` in place of the bits: ``c_j x``."""
        d = (consts[:-1] - consts[1:]).view(-1, 1)
        c = (bits.c.view(d.shape[0], -1) * d).sum(0).view(shape)
        s = (bits.s.view(d.shape[0], -1) * d).sum(0).view(shape)
        return Shared(c + consts[-1], s) if base is None else Shared(c + base.c, s + base.s)

    def reciprocal(self, x: Shared, lo: float = 0.01, hi: float = 500.0, cmp: bool = False, num_bits: int = 0,
                   per_octave: float = 1, steps: int = 3, also: list[tuple] = (), iters: int = 14,
                   lazy: bool = False):
        """``2^num_bits / x`` for x in [lo, hi].

        ``cmp=False``: Newton ``y <- y (2 - x y)`` from ``3 exp(0.5 - x) + 0.003`` (x in [0.01, 500],
        num_bits 0, 14 iterations, ~80 rounds).

        ``cmp=True`` (secure comparisons): x's interval among thresholds ``lo 2^(i/per_octave)`` by one
        batch of comparisons (:meth:`ltz`, bounded by ``1.25 hi``, slack ``lo/16``: 6 rounds when
        ``hi <= 3200 lo``-ish), start ``y0 = kappa 2^num_bits / t_j`` at the interval's upper end with
        ``kappa = 2r/(1+r)`` (r the interval's ratio), so ``e = 1 - x y0 / 2^num_bits`` lies within
        ``+-(r-1)/(r+1)`` (1/3 for octaves); then ``y (1+e)(1+e^2)...(1+e^(2^(steps-1)))`` =
        ``(1 - e^(2^steps)) / x``: relative error ``|e|^(2^steps)`` in ``2 + steps`` rounds, each
        truncation riding in the next product's round (octaves, steps 3: (1/3 + 1/24)^8 < 4e-4, 11
        rounds in all; ``lazy``: the result is its last truncation's :class:`Poly`, one round less).
        ``per_octave=0``: one interval,
        [lo, hi], no comparisons (``|e| <= (hi - lo)/(hi + lo)``; the sigmoid's [1, 2.14]: 0.36, steps 3:
        < 3e-4). ``also``: items of :meth:`run`
        riding in the first product's round; the result is then ``(y, their outputs)``."""
        if not cmp:
            y = self.add_public(self.mul_public(self.exp(self.add_public(-x, 0.5)), 3.0), 0.003)
            for _ in range(iters):
                xy = self.mul(x, y)
                y = self.mul(y, self.add_public(-xy, 2.0))
            return y
        y0, p, pre = self.reciprocal_start(x, lo, hi, num_bits, per_octave)
        y, rest = self.reciprocal_refine(x, y0, num_bits, steps, also=also, lazy=lazy, p=p)
        return (y, pre + rest) if also else y

    def reciprocal_start(self, x: Shared | Poly, lo: float, hi: float, num_bits: int = 0, per_octave: float = 1,
                         also: list[tuple] = ()) -> tuple[Shared, Poly | None, list[Shared]]:
        """The start ``y0`` of :meth:`reciprocal` (``cmp=True``), and the outputs of the single-round
        items ``also``, which ride in the comparisons' last round (in a round of their own when there
        is no comparison: ``per_octave=0``).

        ``x`` may be a lazy truncation: it is compared untruncated, and then the comparisons' last
        step, x's truncation and the first product are one round: ``x y0 = c_m x + sum_i (c_i -
        c_(i+1)) x b_i`` from the products of x with every comparison bit (lazy bits; m - 1 products
        per element). The second value returned is then that product's lazy truncation by
        ``F + num_bits`` (for :meth:`reciprocal_refine`), else None."""
        t = _thresholds(lo, hi, per_octave)
        m = len(t) - 1
        num, slack = 2.0 ** num_bits, lo / 16
        # the comparisons may put x up to ``slack`` above t_j into interval j: centre y0 on [t_{j-1}, t_j + slack]
        ys = self.encode(2 * num / (t[:-1] + t[1:] + torch.where(torch.arange(m) < m - 1, slack, 0.0)))
        src, k = x.source if isinstance(x, Poly) else (x, 0)
        if m == 1:
            return Shared(torch.zeros_like(src.c) + ys[0], torch.zeros_like(src.s)), None, \
                self.run(list(also)) if also else []
        cmp = self._minus_each(src, self.encode(t[1:m], self.f + k))
        if not isinstance(x, Poly):
            bits, rest = self.ltz(cmp, bound=1.25 * hi, slack=slack, also=also) if also else \
                (self.ltz(cmp, bound=1.25 * hi, slack=slack), [])
            return self._interval_const(bits, ys, src.shape), None, rest
        bits = self.ltz(cmp, bound=1.25 * hi, slack=slack, scale=k, lazy=True)
        xe = x.map(lambda u: u.reshape(1, -1).expand(m - 1, -1).reshape(-1))  # threshold-major, as the bits
        xb, b, xv, *rest = self.run([("mul", xe, bits, None), ("force", bits), ("force", x)] + list(also))
        xy0 = self._interval_const(xb, ys, src.shape, base=self.mul_int(xv, ys[-1]))
        return self._interval_const(b, ys, src.shape), self.lazy_trunc(xy0, self.f + num_bits), rest

    def reciprocal_refine(self, x: Shared | Poly, y0: Shared, num_bits: int, steps: int, also: list[tuple] = (),
                          lazy: bool = False, p: Poly | None = None) -> tuple[Shared | Poly, list[Shared]]:
        """:meth:`reciprocal`'s products from the start ``y0``: ``also`` rides in the first one's
        round. ``p``: the first product ``x y0 / 2^(F + num_bits)`` already made (lazy), by
        :meth:`reciprocal_start`; ``also`` then rides in the next round."""
        later, rest = [], []
        if p is None:
            p, *rest = self.run([("mul", x, y0, Lazy(self.f + num_bits))] + list(also))
        else:
            later = list(also)
        e = self.add_public(-p, 1.0)
        y = y0
        for j in range(steps):
            if j < steps - 1:
                e, y, *out = self.run([("mul", e, e, Lazy(self.f)), ("mul", y, self.add_public(e, 1.0), Lazy(self.f))]
                                      + later)
            else:
                y, *out = self.run([("mul", y, self.add_public(e, 1.0), Lazy(self.f))] + later)
            if later:
                rest, later = out, []
        if not lazy:
            y = self.force(y)
        return y, rest

    def rsqrt(self, x: Shared, lo: float, hi: float, iters: int | None = None, times: Shared | Poly | None = None,
              extra: int = 0, per_octave: int = 16) -> Shared:
        """``1/sqrt(x)`` (``times * 1/sqrt(x)`` with ``times``, broadcast over the last dim) for x in
        [lo, hi].

        With ``rsqrt_guess`` (secure comparisons): x's interval among thresholds
        ``lo 2^(i/per_octave)`` by one batch of comparisons (8 rounds), start ``y0 = kappa/sqrt(t_j)``
        (t_j the interval's upper end, ``kappa = 2 sqrt(r)/(1 + sqrt(r))``: ``|y0 sqrt(x) - 1| <= 0.011``
        for 16 per octave); ``y0^2`` is the same one-hot sum of public constants (encoded with 18
        more fraction bits), so ``e = 1 - x y0^2`` is one product, and one Newton step
        ``y0 (2 + e) / 2`` (the /2 folded into the truncation) leaves a relative error ~ 3 e^2 / 8
        < 2e-4: 11 rounds (each product's truncation in the next one's round). ``times * y0`` rides
        in the round of ``x y0^2`` (``times`` may be a lazy truncation). ``extra``: x comes at
        scale 2^(F + extra) (compared as is; its truncation rides in the comparisons' last round).
        x y0^2 must stay below ~15 (x < 15 hi).

        Otherwise Newton ``y <- y (3 - x y^2) / 2`` from the constant ``1/sqrt(hi)`` (31 iterations,
        217 rounds, over a 1e9 range)."""
        if self.rsqrt_guess:
            G = 18
            t = _thresholds(lo, hi, per_octave)
            m = len(t) - 1
            sr = (t[1:] / t[:-1]).sqrt()
            cs = self.encode(2 * sr / (1 + sr) / t[1:].sqrt())  # interval j's start, j = 1..m
            ws = self.encode(self.decode(cs) ** 2, self.f + G)  # its square, G more fraction bits
            if m > 1:
                cmp = self._minus_each(x, self.encode(t[1:m], self.f + extra))
                if extra:  # x's truncation to scale 2^F rides in the comparisons' last round
                    bits, (x,) = self.ltz(cmp, also=[("trunc", x, extra)])
                else:
                    bits = self.ltz(cmp)
                y0, w0 = self._interval_const(bits, cs, x.shape), self._interval_const(bits, ws, x.shape)
            else:
                if extra:
                    x = self.trunc(x, extra)
                y0 = Shared(torch.zeros_like(x.c) + cs[0], torch.zeros_like(x.s))
                w0 = Shared(torch.zeros_like(x.c) + ws[0], torch.zeros_like(x.s))
            items = [("mul", x, w0, Lazy(self.f + G))]
            if times is not None:
                items.append(("mul", times, y0.map(lambda u: u.expand(times.shape)), Lazy(self.f)))
            p, *ty = self.run(items)
            e2 = self.add_public(-p, 3.0)  # 2 + e = 3 - x y0^2
            base = ty[0] if times is not None else y0
            (y,) = self.run([("mul", base, e2.map(lambda u: u.expand(base.shape)), Lazy(self.f + 1))])
            return self.force(y)
        if extra:
            x = self.trunc(x, extra)
        y = self.add_public(Shared(torch.zeros_like(x.c), torch.zeros_like(x.s)), 1 / math.sqrt(hi))
        if iters is None:  # ~1.5x growth per step while far below, then quadratic
            iters = math.ceil(math.log(math.sqrt(hi / lo)) / math.log(1.5)) + 5
        for _ in range(iters):
            xy2 = self.mul(self.mul(x, y), y)  # (x y) y: y^2 alone has too few bits when y is small
            y = self.mul(y, self.mul_public(self.add_public(-xy2, 3.0), 0.5))
        if times is not None:
            y = self.mul(times, y.map(lambda u: u.expand(times.shape)))
        return y

    def sigmoid(self, x: Shared | Poly, times: Shared | None = None, also: list[tuple] = (), steps: int = 4,
                untrunc: tuple[Shared, torch.Tensor] | None = None) -> Shared:
        """``sigmoid(x)`` (``times * sigmoid(x)`` with ``times``). ``also``: products (untruncated)
        riding in the round after the comparisons; their truncation rides in exp's first round, and
        ``times`` may then be the index of the item whose result it multiplies (see :meth:`silu_gate`).
        ``untrunc = (src, k)`` (with comparisons): x is the lazy truncation of ``src`` by the
        per-element shifts ``k`` (a linear layer's output): the comparisons read src as it is and
        x's value comes out of the round after them, so the layer's truncation costs no round.

        With ``clip_sigmoid`` (comparisons), for any x with |x| < ~3900: one batch of bounded
        comparisons gives the clip's bits ``[x < 16]``, ``[-x < 16]`` and the sign ``s = [x < 0]``
        (x/8 truncated in its last round: 6 rounds); one round of bit products (no truncation)
        gives ``-a/8 = -min(|x|, 16)/8``; ``t = e^{-a} = p6(-a/8)^8`` (exp, degree 6, n = 3: 12
        rounds) lies in (0, 1]; then ``sigmoid(x) = g / (1 + t)`` with ``g = 1 - s (1 - t)`` (1 for
        x >= 0; t = e^x for x < 0, so no cancellation for large negative x), ``1/(1 + t)`` over
        [1, 2.14] from a public start with no comparisons, ``steps`` factors (relative error
        ``0.362^(2^steps)``: 9e-8 for the default 4; one round per factor after the first, each
        a product of three), and ``(times g) / (1 + t)``: 17 rounds for SiLU. The sign may read 0 <= x < CMP_SLACK as negative (see :meth:`ltz`): the formula is
        exact for either sign, and then t <= e^{CMP_SLACK}, inside the reciprocal's range. One
        exponential of a non-positive argument and 3 comparisons per element in all (the
        earlier ``e^{x/2} / (e^{x/2} + e^{-x/2})`` took two exponentials and a comparison-started
        reciprocal: 14 comparisons per element, most of the protocol's traffic).
        ``|times| < 2^14`` keeps ``times g / (1 + t)`` at scale 2^2F below 2^62.
        Without comparisons: ``e^{x/2} / (e^{x/2} + e^{-x/2})`` from ``h = x/2`` with the
        exp-started reciprocal, for x in [-16, 16]."""
        if self.clip_sigmoid:
            n = math.prod(x.shape)
            flat = x.map(lambda t: t.reshape(-1))
            if untrunc is None:
                cmp, scale = cat([self.add_public(flat, -16.0), self.add_public(-flat, -16.0), flat], 0), 0
            else:  # 16 at each element's scale 2^(F + k)
                src, k = untrunc[0].map(lambda t: t.reshape(-1)), untrunc[1].expand(untrunc[0].shape).reshape(-1)
                t16 = torch.bitwise_left_shift(torch.full_like(k, 16), self.f + k)
                cmp, scale = Shared(torch.cat([src.c - t16, -src.c - t16, src.c]), torch.cat([src.s, -src.s, src.s])), k.repeat(3)
            # the bits lazy: the comparisons' last step rides in the round of x's products with them (exact
            # at scale 2^F: the bits are integers), where the bits' values come out too
            bits = self.ltz(cmp, bound=self.CMP_BOUND, slack=self.CMP_SLACK, lazy=True, scale=scale)
            nh, nl, sg = (bits.map(lambda t, a=a: t[a * n:(a + 1) * n]) for a in range(3))
            ph, pl, ps, nh, nl, sign, *raw = self.run(
                [("mul", flat, nh, None), ("mul", flat, nl, None), ("mul", flat, sg, None),
                 ("force", nh), ("force", nl), ("force", sg)] + ([("force", flat)] if untrunc else []) + list(also))
            if untrunc:
                flat, *raw = raw
            # -min(|x|, 16)/8 = -(x/8 - 2 s x/8) + relu((x - 16)/8) + relu((-16 - x)/8), i.e. 8 u =
            # 2 x s - x - (x - 16) nh - (-x - 16) nl - 32 = 2 ps - x - ph + pl + 16 (nh + nl) - 32: one lazy /8
            u8 = self.add_public(ps + ps - flat - ph + pl + self.mul_int(nh + nl, self.encode(torch.tensor(16.0))), -32.0)
            u = self.lazy_trunc(u8, 3).map(lambda t: t.reshape(x.shape))
            tr = [("trunc", z_, self.f) for z_ in raw]  # gate * up, truncated in exp's first round
            # t with X = 6 more fraction bits (the last squaring truncates by F - X): for x < 0, times t
            # is the result, and |times| up to 2^14 would scale t's last unit at 2^-F into ~0.06
            X = 6
            t, prods = self.exp(u, n=3, deg=6, given_u=True, post=-X, also=tr, lazy=True) if tr else \
                (self.exp(u, n=3, deg=6, given_u=True, post=-X, lazy=True), [])
            if isinstance(times, int):
                times = prods[times]
            sign = sign.map(lambda t_: t_.reshape(x.shape))
            # 1/(1 + t) from the public start c (1 + t in [1, 1 + e^slack]): e = 1 - c (1 + t), |e| < 0.362,
            # y = c (1 + e)(1 + e^2)...(1 + e^(2^(steps-1))) = (1 - e^(2^steps)) / (1 + t); c (1 + e) is
            # linear in t. t is exp's lazy truncation of its last square z (scale 2^2F, by F - X): c t and
            # c^2 t at scale 2^F are lazy truncations of c z, c^2 z (< 2^61) by 2F, and every truncation
            # below rides in the round of the product that uses it
            c = 2 / (2 + math.exp(self.CMP_SLACK))
            z, kz = t.source
            ct, c2t = (self.lazy_trunc(self.mul_int(z, self.encode(torch.tensor(v))), kz + self.f + X) for v in (c, c * c))
            one_t = (-t).add_public(self.encode(torch.tensor(1.0), self.f + X))  # 1 - t at scale 2^(F+X)
            sa = one_t * Poly.of(sign)  # s (1 - t) (scale 2^(F+X)), multiplied out in the round that uses it
            e = self.add_public(-ct, 1 - c)
            y = self.add_public(-c2t, 2 * c - c * c)
            # sigmoid = g / (1 + t) with g = 1 - s (1 - t): x < 0 gives t / (1 + t), t = e^x.
            # Each round multiplies y by 1 + p^2 (p = e^(2^(j-1))) as one product of three factors
            # (y + y p p at scale 2^3F: y <= 1, p^2 < 0.14) and squares p alongside: steps - 1 rounds
            if times is None:
                first = [("force", sa)]
            else:  # |times sa| < 2^(14 + F + F + X) = 2^60
                first = [("mul", times, sa, Lazy(self.f + X))]
            p_ = e
            for j in range(1, steps):
                py, pp = Poly.of(y), Poly.of(p_)
                items = [("force", py.scale(1 << 2 * self.f) + py * pp * pp, Lazy(2 * self.f))]
                if j < steps - 1:
                    items.append(("mul", p_, p_, Lazy(self.f)))
                y, *nxt = self.run(items + (first if j == 1 else []))
                if j == 1:
                    g = nxt.pop()
                    q, qx = (Shared(self.encode(torch.tensor(1.0), self.f + X) - g.c, -g.s), X) if times is None \
                        else (times - g, 0)  # g at 2^(F+X), or times g
                p_ = nxt[0] if nxt else p_
            (out,) = self.run([("mul", q, y, self.f + qx)])
            return out
        if also:
            raw = self.run(list(also))
            prods = self.trunc_many([(z, self.f) for z in raw])
            if isinstance(times, int):
                times = prods[times]
        h = self.trunc(x, 1)
        both = self.exp(cat([h, -h], 0))
        ep, em = both.map(lambda t: t[:h.shape[0]]), both.map(lambda t: t[h.shape[0]:])
        d = self.mul_public(ep + em, 1 / 32)  # [2, 6000] -> [1/16, 190]
        y = self.mul_public(self.mul(ep, self.reciprocal(d)), 1 / 32)
        return y if times is None else self.mul(times, y)

    def silu(self, x: Shared) -> Shared:
        return self.sigmoid(x, times=x)

    def silu_gate(self, x: "Shared | LazySum", up: "Shared | LazySum") -> Shared:
        """``silu(x) * up = sigmoid(x) * (x up)``: the product x up rides in the clip's last round.
        As LazySums (the gate_up layer's untruncated outputs; with comparisons): their truncations
        ride in that round too (:meth:`sigmoid`'s ``untrunc``)."""
        if isinstance(x, LazySum):
            # shifts at full shape: the Poly's tensor coefficients then follow its reshapes
            xp, upp = (self.lazy_trunc(z.src, z.k.expand(z.src.shape)) for z in (x, up))
            return self.sigmoid(xp, times=0, also=[("mul", xp, upp, None)], untrunc=(x.src, x.k))
        return self.sigmoid(x, times=0, also=[("mul", x, up, None)])

    def gelu_tanh(self, x: Shared) -> Shared:
        x3 = self.mul(self.square(x), x)
        z = self.mul_public(x + self.mul_public(x3, 0.044715), 2 * math.sqrt(2 / math.pi))
        # 0.5 x (1 + tanh(z/2)) = x sigmoid(z)
        return self.sigmoid(z, times=x)

    def softmax(self, x: Shared, mask: torch.Tensor | None = None, shift: float = 0.0,
                values: Shared | None = None) -> Shared:
        """Softmax over the last dim (``softmax(x) @ values`` with ``values``). ``mask``: public 0/1
        (1 = allowed) of x's shape.

        With ``exact_max`` (comparisons): masked keys get -2000, the row max by the bounded
        tournament (score spreads below 2000), so ``x - m <= L/8`` (L = ceil(log2 n) layers) and the
        sum s lies in [1, n e^{L/8}]; exp with n = 8; ``2^nb / s`` by the comparison-started
        reciprocal (4 thresholds per octave, so ``|e| <= 0.09``, two factors: error < 1e-4, 12
        rounds), with ``e @ values`` riding in its first product; then ``(e @ values) (2^nb / s)``
        truncated by F + nb (nb = 8 fraction bits more for 1/s: |values| < 2^13)."""
        n = x.shape[-1]
        if self.exact_max:  # x - max(x) <= 0: exp's range is safe whatever the scores' spread
            big = torch.zeros(x.shape, dtype=torch.float64)
            if mask is not None:
                big = big.masked_fill(~mask, -2000.0)  # masked keys can never be the max
            # exp's u = (x - m) / N from x / N and m / N, both out of the max (no round of their own):
            # N = 3^4 2, four cubings and a squaring (the last: s sums its untruncated squares)
            N = 162
            _, mN, xN = self.max_last_scaled(self.add_public(x, big), self._DIV_BITS, round(2 ** self._DIV_BITS / N))
            u = self.add_public(xN, -big / N) - mN.map(lambda t: t.expand(x.shape))
            # e lazy: the sum s truncated once from the untruncated squares, compared as is, and e itself
            # forced in the comparisons' last round
            e = self.exp(u, n=1, cubes=4, given_u=True, lazy=True)
            z, k = e.source
            if mask is not None:
                z = self.mul_int(z, mask.to(torch.int64))
            hi = n * 1.01  # the max is exact: every term <= 1 (up to exp's error), the max's term ~1
            nb = min(8, math.ceil(math.log2(hi)))
            s = self.lazy_trunc(z.sum(-1, keepdim=True), k)
            y0, p, (e,) = self.reciprocal_start(s, 0.99, hi, num_bits=nb, per_octave=4, also=[("force", e)])
            if mask is not None:
                e = self.mul_int(e, mask.to(torch.int64))
            # 1/s and e @ values stay lazy truncations: both ride in the round of their product
            if values is None:
                r, _ = self.reciprocal_refine(s, y0, nb, steps=2, lazy=True, p=p)
                (y,) = self.run([("mul", e, r.map(lambda t: t.expand(x.shape)), self.f + nb)])
                return y
            r, (ev,) = self.reciprocal_refine(s, y0, nb, steps=2, also=[("matmul", e, values, Lazy(self.f))], lazy=True, p=p)
            (y,) = self.run([("mul", ev, r.map(lambda t: t.expand(ev.shape)), self.f + nb)])
            return y
        if mask is not None:  # mean over the allowed entries only, masked ones set to the mean
            cnt = mask.sum(-1, keepdim=True).to(torch.float64)
            xm = self.mul_int(x, mask.to(torch.int64))
            mean = self.mul_public(xm.sum(-1, keepdim=True), 1 / cnt)
        else:
            mean = self.mul_public(x.sum(-1, keepdim=True), 1 / n)
        centred = x - mean.map(lambda t: t.expand(x.shape))
        e = self.exp(self.add_public(centred, -shift))
        if mask is not None:
            e = self.mul_int(e, mask.to(torch.int64))
        # s / n lies in [1/n, e^(max - mean - shift)]: inside the reciprocal's range for n <= 64
        # keys and centred scores up to ~6 (see the module docstring)
        cnt = mask.sum(-1, keepdim=True).to(torch.float64) if mask is not None else torch.tensor(float(n))
        r = self.mul_public(self.reciprocal(self.mul_public(e.sum(-1, keepdim=True), 1 / cnt)), 1 / cnt)
        probs = self.mul(e, r.map(lambda t: t.expand(x.shape)))
        return probs if values is None else self.matmul_many([(probs, values)])[0]


# -- linear layers on shares and the plan executor (simulated two parties) --------------------
WEIGHT_BITS = 16  # a row encodes as round(W * 2^k_j), k_j <= WEIGHT_BITS: products stay below 2^(F+16) per unit


def encode_weights_pow2(w: torch.Tensor, partner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float (out, in) -> (int64 weights, per-row public shifts k_j). ``partner``: row j's shift is
    also row ``partner[j]``'s (the smaller of the two): RoPE rotates rows j and j + D/2 of each
    head together, and on untruncated products they must share their scale."""
    w = w.to(torch.float64)
    peak = w.abs().amax(dim=1).clamp_min(1e-30)
    k = torch.clamp(torch.floor(torch.log2(ring.WMAX / peak)), max=WEIGHT_BITS).to(torch.int64)
    if partner is not None:
        k = torch.minimum(k, k[partner])
    w_int = torch.round(w * torch.pow(2.0, k.to(torch.float64))[:, None]).to(torch.int64)
    return w_int.clamp_(-ring.WMAX, ring.WMAX), k


def mpc_matrices(model) -> dict[str, tuple[ring.RingMatrix, torch.Tensor]]:
    from .masked import _cached, unit_weight, units_for

    rope = _rope_linears(model.plan)

    def make():
        out = {}
        for name, u in units_for(model.plan, "v3").items():
            partner, at = [], 0
            for op in u.ops:  # rows j and j + D/2 of each rotated head share their shift
                rows = torch.arange(op.out_dim)
                if op.name in rope:
                    D = rope[op.name]
                    rows = rows // D * D + (rows % D + D // 2) % D
                partner.append(rows + at)
                at += op.out_dim
            w_int, k = encode_weights_pow2(unit_weight(u, model.weights), torch.cat(partner))
            out[name] = (ring.RingMatrix(w_int), k)
        return out
    return _cached(model, ("mpc-matrices",), make)


def _rope_linears(plan) -> dict[str, int]:
    """The linear steps whose outputs a RoPE attention rotates (its q and k), with the head dim."""
    from ..models.plan import Attention, Linear

    made, out = {}, {}
    for step in plan.steps:
        if isinstance(step, Linear):
            made[step.out] = step.name
        elif isinstance(step, Attention) and step.rope:
            out.update({made[step.q]: step.head_dim, made[step.k]: step.head_dim})
    return out


@dataclasses.dataclass
class Ranges:
    """Public ranges the approximations are run for (a property of the model, not the prompt)."""

    # mean square of a norm's input: rsqrt is accurate (rel. err < 2e-3) for S = d * ms in
    # [d norm_lo, d norm_hi]; above, y = 1/sqrt(S) has few bits at scale 2^F (SmolLM2's
    # "massive activation" rows reach ms ~ 9e5: 2% error there)
    norm_lo: float = 1e-3
    norm_hi: float = 1e4
    softmax_shift: float = 0.0
    # secure comparisons (boolean AND triples): softmax subtracts the exact row max, and the
    # sigmoid's input is clipped to [-16, 16]; needed for real models (SmolLM2's centred scores
    # reach 34 and its gates 49)
    comparisons: bool = False

    @classmethod
    def wide(cls) -> "Ranges":
        """For SmolLM2-like models: mean squares up to 1e6, comparisons on."""
        return cls(norm_lo=1e-3, norm_hi=1e6, comparisons=True)


class MPCExecutor:
    """Runs a model's plan with every activation shared (both parties simulated by ``engine``).

    Linear units are the fused v3 units; the KV cache holds shares. Only the logits are
    revealed, to the client.
    """

    def __init__(self, model, engine: Engine | None = None, ranges: Ranges | None = None, store=None):
        """``store``: the client's mask material (preprocess.MaterialStore over :func:`mpc_matrices`),
        needed when ``engine`` is the client party of the networked protocol."""
        from ..models.reference import Reference
        from .masked import units_for

        self.model = model
        self.e = engine or Engine()
        self.store = store
        if self.e.role == "client" and store is None:
            raise ValueError("the v3-mpc client needs mask material (r, W r) for its linear layers")
        self.ranges = ranges or Ranges()
        self.mats = mpc_matrices(model)
        self.e.exact_max = self.e.clip_sigmoid = self.e.rsqrt_guess = self.ranges.comparisons
        self.units = units_for(model.plan, "v3")
        self.rope = Reference.of(model).rope
        self.length = 0
        self.k_cache: dict[int, Shared] = {}
        self.v_cache: dict[int, Shared] = {}

    def new_cache(self, capacity: int = 0):
        self.length = 0
        self.k_cache, self.v_cache = {}, {}

    def linear(self, ops, x: Shared, lazy: bool = False) -> list[Shared] | list[LazySum]:
        """``lazy`` (no bias): each op's output untruncated, as a :class:`LazySum` (the norm or the
        RoPE attention that reads it truncates it in a round of its own)."""
        key = ops[0].fuse_group if ops[0].fuse_group else ops[0].name
        W, k = self.mats[key]
        if self.e.role is None:  # simulator: the same products, both slots here
            y = self.e.ring_matmul(W, x)
        elif self.e.role == "client":  # re-share into the mask r; W r is preprocessed: no product online
            r, wr = self.store.take(key, x.shape[0])
            self.e.reshare(x, r)
            y = Shared(wr, VOID)
        else:  # the server multiplies its share x - r by the ring weights on its device
            x = self.e.reshare(x, None)
            y = Shared(VOID, self.e.transport.offload(lambda: W.matmul(x.s).cpu()))
        if lazy:  # no bias (checked by the caller): the truncation is the consumer's
            outs, at = [], 0
            for op in ops:
                outs.append(LazySum(None, y.map(lambda t, a=at, b=op.out_dim: t[:, a:a + b]), k[at:at + op.out_dim]))
                at += op.out_dim
            return outs
        y = self.e.trunc(y, k)
        outs, at = [], 0
        for op in ops:
            part = y.map(lambda t: t[:, at:at + op.out_dim])
            at += op.out_dim
            if op.bias:
                part = self.e.add_public(part, self.model.weights[op.bias].to(torch.float64))
            outs.append(part)
        return outs

    def norm(self, step, x: Shared | LazySum) -> tuple[Shared, Shared]:
        """RMSNorm / LayerNorm on shares; returns the output and x (its value, when x came as a
        :class:`LazySum`). ``S = sum x^2`` is formed from ``x / 2^8`` squared without
        truncation (scale 2^2F) and summed before one truncation by ``F - 16`` bits, so elements up
        to ~2^14 neither overflow the ring nor lose small rows' precision; ``1/sqrt(d)`` is folded
        into the public weight: ``x rsqrt(mean x^2 + eps) = sqrt(d) x rsqrt(S + d eps)``.
        An RMS norm of ``h + trunc(W a, k)`` (a LazySum) squares ``h / 2^8 + trunc(W a, k + 8)`` (one
        ulp more) and truncates ``W a`` by ``k`` in that round: the linear layer's truncation costs
        no round of its own."""
        e, w = self.e, self.model.weights
        d = x.shape[-1] if isinstance(x, Shared) else x.src.shape[-1]
        if step.kind == "layer":
            if isinstance(x, LazySum):
                raise ValueError("a LayerNorm's input is a value, not a LazySum")
            x = x - e.mul_public(x.sum(-1, keepdim=True), 1 / d).map(lambda t: t.expand(x.shape))
        # x / 2^8 (for S) and x * w sqrt(d) (what rsqrt multiplies); both truncations lazy: x/2^8's in
        # the round of its square, x w sqrt(d)'s in rsqrt's first product. w sqrt(d) with 12 fraction
        # bits: x w sqrt(d) 2^(F+12) stays below 2^62 for SmolLM2's massive activations (|x| ~ 2^14.5,
        # w sqrt(d) up to ~2^7); with 20 bits it overflowed the truncation
        wv = e.encode(w[step.weight].to(torch.float64) * math.sqrt(d), 12)
        if isinstance(x, LazySum):
            xs = e.lazy_trunc(x.src, x.k + 8)
            xs = xs if x.h is None else e.lazy_trunc(x.h, 8) + xs
            sq, o = e.run([("mul", xs, xs, None), ("force", e.lazy_trunc(x.src, x.k))])
            x = o if x.h is None else x.h + o
        else:
            xs = e.lazy_trunc(x, 8)
            (sq,) = e.run([("mul", xs, xs, None)])
        xw = e.lazy_trunc(e.mul_int(x, wv), 12)
        # S at scale 2^(2F-16); rsqrt compares it as is and truncates it by F - 16 on the way
        S = sq.sum(-1, keepdim=True)
        S = Shared(S.c + e.encode(torch.tensor(d * step.eps), 2 * e.f - 16), S.s)
        y = e.rsqrt(S, d * self.ranges.norm_lo, d * self.ranges.norm_hi, times=xw, extra=e.f - 16)
        if step.bias:
            y = e.add_public(y, w[step.bias].to(torch.float64))
        return y, x

    # RoPE on the qkv layer's untruncated output: cos and sin with this many fraction bits
    # (|q| 2^(F + 16 + 16) < 2^62 for |q| < 2^10; SmolLM2's q and k stay below 21)
    ROPE_BITS = 16

    def attention(self, step, q: Shared | LazySum, k: Shared | LazySum, v: Shared | LazySum) -> Shared:
        """``q``, ``k``, ``v`` as LazySums (the qkv layer's untruncated outputs, RoPE): the rotation
        runs on them (a rope pair of weight rows shares its shift) and one round truncates q (its
        1/sqrt(D) folded in), k and v, where the layer's truncation and the rotation's took two."""
        e = self.e
        lazy = isinstance(q, LazySum)
        T, start = (q.src if lazy else q).shape[0], self.length
        end = start + T
        H, KV, D = step.n_heads, step.n_kv_heads, step.head_dim
        if lazy:  # per-column shifts, laid out as the heads below
            ks = [z.k.view(n, 1, D).expand(n, T, D) for z, n in ((q, H), (k, KV), (v, KV))]
            q, k, v = q.src, k.src, v.src
        q = q.map(lambda t: t.view(T, H, D).transpose(0, 1))
        k = k.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        v = v.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        if step.rope:
            cos, sin = (t.to(torch.float64) for t in self.rope.tables(start, end))
            half = D // 2

            def rot(s: Shared) -> Shared:
                return s.map(lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1))

            # q's 1/sqrt(D) folded into its rotation: both rotations in one round of truncations
            b = self.ROPE_BITS if lazy else e.f
            sd = math.ceil(math.log2(math.sqrt(D)))  # 1/sqrt(D) keeps b bits: encoded with b + sd
            c, s_ = e.encode(cos, b), e.encode(sin, b)
            cq, sq = e.encode(cos / math.sqrt(D), b + sd), e.encode(sin / math.sqrt(D), b + sd)
            qr, kr = e.mul_int(q, cq) + e.mul_int(rot(q), sq), e.mul_int(k, c) + e.mul_int(rot(k), s_)
            if lazy:
                q, k, v = e.trunc_many([(qr, ks[0] + b + sd), (kr, ks[1] + b), (v, ks[2])])
            else:
                q, k = e.trunc_many([(qr, b + sd), (kr, b)])
        elif lazy:
            raise ValueError("untruncated q, k, v are for a RoPE attention")
        if step.layer in self.k_cache:
            k = cat([self.k_cache[step.layer], k], 1)
            v = cat([self.v_cache[step.layer], v], 1)
        self.k_cache[step.layer], self.v_cache[step.layer] = k, v
        group = H // KV
        q = q.map(lambda t: t.reshape(KV, group * T, D))
        (scores,) = e.matmul_many([(q, k.map(lambda t: t.transpose(1, 2)))])
        if not step.rope:
            scores = e.mul_public(scores, 1 / math.sqrt(D))
        kpos = torch.arange(end)[None, :]
        qpos = torch.arange(start, end)[:, None]
        allowed = kpos <= qpos
        window = self.model.config.sliding_window
        if window is not None:
            allowed &= kpos > qpos - window
        mask = allowed[None].expand(group, T, end).reshape(group * T, end)[None].expand(KV, group * T, end)
        out = e.softmax(scores, mask=mask, shift=self.ranges.softmax_shift, values=v)
        return out.map(lambda t: t.reshape(H, T, D).transpose(0, 1).reshape(T, H * D))

    def forward(self, ids: list[int] | None = None, n_tokens: int | None = None,
                all_logits: bool = False) -> torch.Tensor | None:
        """Logits (1, vocab) of the last position, revealed to the client. The server party has no
        ids: it passes ``n_tokens`` and gets None. ``all_logits`` (simulator only) reveals every
        position's logits: teacher forcing over a whole text in one forward, for accuracy tests."""
        from ..models.plan import Activation, Add, Attention, Embed, Linear, Norm

        plan, w, e = self.model.plan, self.model.weights, self.e
        n_tokens = len(ids) if ids is not None else n_tokens
        if all_logits and e.role is not None:
            raise ValueError("all_logits is for the two-party simulator: the protocol reveals the last position only")
        env: dict[str, Shared] = {}
        steps = plan.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            if i == plan.head_start and not all_logits:
                env[step.inp] = env[step.inp].map(lambda t: t[-1:])
            if isinstance(step, Linear):
                ops = [step]
                while step.fuse_group and i + len(ops) < len(steps) and \
                        getattr(steps[i + len(ops)], "fuse_group", None) == step.fuse_group:
                    ops.append(steps[i + len(ops)])
                # a residual's linear layer whose sum an RMS norm reads next, or the qkv layer of a RoPE
                # attention: its truncation rides in their first round
                nxt = steps[i + len(ops):i + len(ops) + 2]
                lazy = not any(op.bias for op in ops) and len(nxt) == 2 and (
                    len(ops) == 1 and isinstance(nxt[0], Add) and step.out in nxt[0].inputs
                    and isinstance(nxt[1], Norm) and nxt[1].kind == "rms" and nxt[1].inp == nxt[0].out
                    or isinstance(nxt[0], Attention) and nxt[0].rope
                    and {nxt[0].q, nxt[0].k, nxt[0].v} == {op.out for op in ops}
                    or isinstance(nxt[0], Activation) and nxt[0].kind == "silu_gate" and e.clip_sigmoid
                    and tuple(nxt[0].inputs) == tuple(op.out for op in ops))
                for op, out in zip(ops, self.linear(tuple(ops), env[step.inp], lazy=lazy)):
                    env[op.out] = out
                i += len(ops)
                continue
            if isinstance(step, Embed):  # the client's own input, shared
                if e.role == "server":
                    env[step.out] = e.share(shape=(n_tokens, w[step.weight].shape[1]))
                else:
                    x = torch.nn.functional.embedding(torch.tensor(ids, dtype=torch.long),
                                                      w[step.weight]).to(torch.float64)
                    if step.pos_weight:
                        x = x + w[step.pos_weight][self.length:self.length + n_tokens]
                    env[step.out] = e.share(x)
            elif isinstance(step, Norm):
                env[step.out], env[step.inp] = self.norm(step, env[step.inp])
            elif isinstance(step, Attention):
                env[step.out] = self.attention(step, env[step.q], env[step.k], env[step.v])
            elif isinstance(step, Add):
                env[step.out] = env[step.inputs[0]] + env[step.inputs[1]]
            elif isinstance(step, Activation):
                if step.kind == "silu_gate":
                    env[step.out] = e.silu_gate(env[step.inputs[0]], env[step.inputs[1]])
                else:
                    env[step.out] = e.gelu_tanh(env[step.inputs[0]])
            else:
                raise TypeError(f"not a plan step: {step!r}")
            i += 1
        self.length += n_tokens
        logits = e.reveal(env["logits"])
        return None if logits is None else logits.to(torch.float32)
