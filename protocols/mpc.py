"""v3-mpc arithmetic: every activation additively shared over Z_2^64, nonlinear layers on shares.

STATUS: this module is the share arithmetic and the plan executor, written once and run in two
ways. :class:`Engine` without a transport is a *two-party simulator* (both shares in one
process; what the accuracy tests measure). With a transport it is *one party* of the networked
``v3-mpc`` protocol (protocols/mpc_service.py): it holds only its own share, and every opening
is one message each way with the other party (all openings of a step batched into that one
round), the client's input and linear-layer re-shares are one-way messages, and only the
logits are revealed, to the client. Triples: the client as seeded dealer
(:class:`beaver.SeededDealerProvider`) or joint IKNP/Gilboa generation over the session channel
(:class:`beaver_ot.NetOTProvider`, AND triples from random OT). Rounds are not
optimised: about 390 per layer per forward with comparisons (11.7k per SmolLM2 decode token,
most in softmax and SiLU), which dominates the online time.

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
round. No failure probability as long as ``|x| < 2^62`` (values below 2^22 at scale 2^2F).
``Engine.local_trunc = True`` switches back to SecureML's local truncation (tests only).

Linear layers. The server's weights are integers with a per-row power-of-two scale
``2^k_j`` (``k_j`` public, about 20 significant bits per row). Networked, the client first
re-shares its share into a preprocessed mask ``r`` (it sends ``x_c - r``; the server now holds
``x - r``), the server computes ``W (x - r)`` on its device and the client takes ``W r`` from its
mask material (protocols/preprocess.py, dealt over these ring weights in the offline phase):
no heavy linear work for the client online. (The simulator computes ``W x_c`` and ``W x_s``,
the same sum.) Then the truncation by ``k_j`` (the wrap-bit scheme below) restores scale 2^F.

Nonlinear functions (each documented with its range and measured error in the tests):

- ``exp``: limit form ``(1 + x/2^n)^(2^n)`` with a cubic Taylor base, n squarings; accurate
  for x in [-12, 8] (rel. err < 2e-3 at F = 20); x above ~10 overflows the ring.
- ``reciprocal``: Newton ``y <- y (2 - x y)`` from ``y0 = 3 exp(0.5 - x) + 0.003``, for x in
  [0.01, 500] (14 iterations, rel. err < 1e-3).
- ``rsqrt``: Newton ``y <- y (3 - x y^2) / 2`` from ``y0 = 1/sqrt(hi)``, x in [lo, hi] given by
  the caller (the norm's public range), rel. err < 1e-3. With comparisons, Newton starts instead
  from ``1/sqrt`` of the upper end of x's interval among thresholds a factor 4 apart (one batch
  of comparisons): 6 iterations, 50 rounds instead of 217 over SmolLM2's range, same error.
- ``sigmoid(x) = e^{x/2} / (e^{x/2} + e^{-x/2})``, for x in [-16, 16]; SiLU = x sigmoid(x)
  (abs. err < 2e-3 on [-16, 16]); GELU(tanh) through ``0.5 (1 + tanh(z)) = sigmoid(2z)``,
  for x in [-4, 4] only (beyond, 2z leaves the sigmoid's range).
- ``softmax``: with ``Ranges.comparisons`` (what real models need), the exact row max by a
  tournament of secure comparisons (``ltz``: A2B of the two shares by a Kogge-Stone adder over
  XOR shares with boolean AND triples, 7 rounds, then B2A by one Beaver product; exact), so
  exp only sees x - max <= 0 and the sum lies in [1, n]. Without comparisons: scores minus
  their row mean, which is safe only while the centred scores stay below ~6 and a row holds
  at most 64 keys. Masked keys (causal / sliding window) are multiplied by public 0/1.
- with comparisons, the sigmoid's input is first clipped to [-16, 16] (two ReLUs in the same
  rounds), so SiLU is accurate for any gate value (SmolLM2's reach 49).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import beaver, ring

FRAC_BITS = 20
_OFFSET = 1 << 62


def _msb(t: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_right_shift(t, 63) & 1


def _lsr(t: torch.Tensor, k) -> torch.Tensor:
    """Logical shift right of int64 bits (as unsigned)."""
    k = torch.as_tensor(k, dtype=torch.int64)
    mask = torch.bitwise_left_shift(torch.ones_like(k), 64 - k) - 1
    return torch.bitwise_right_shift(t, k) & mask


@dataclasses.dataclass
class Shared:
    c: torch.Tensor  # client share (int64)
    s: torch.Tensor  # server share (int64)

    @property
    def shape(self):
        return self.c.shape

    def __add__(self, o: "Shared") -> "Shared":
        return Shared(self.c + o.c, self.s + o.s)

    def __sub__(self, o: "Shared") -> "Shared":
        return Shared(self.c - o.c, self.s - o.s)

    def __neg__(self) -> "Shared":
        return Shared(-self.c, -self.s)

    def map(self, fn) -> "Shared":
        """A local, share-wise linear rearrangement (view, transpose, slice, cat of one)."""
        return Shared(fn(self.c), fn(self.s))

    def sum(self, dim, keepdim=False) -> "Shared":
        return Shared(self.c.sum(dim, keepdim=keepdim), self.s.sum(dim, keepdim=keepdim))


def cat(xs: list[Shared], dim: int) -> Shared:
    return Shared(torch.cat([x.c for x in xs], dim), torch.cat([x.s for x in xs], dim))


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
    other slot starts as zeros and is a don't-care from then on (e.g. the client-only public
    offsets land in it on the server). That is sound because every local operation is slot-wise
    (each slot is computed from the same slot of its inputs and from public values), and the
    only cross-slot points -- :meth:`share`, :meth:`open`, :meth:`reveal`, :meth:`reshare` and
    the triple provider -- go through the transport and read or send only this party's slot.
    The engine is synchronous: the transport blocks its thread for each exchange.
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
            return Shared(torch.zeros_like(sent), sent)
        r = self.prg.ring(*x.shape)
        self.stats.shared_elements += x.numel()
        sent = self.encode(x) - r
        if self.view is not None:
            self.view.append(sent.clone())
        if self.role == "client":
            self.transport.to_server("input", sent)
            return Shared(r, torch.zeros_like(r))
        return Shared(r, sent)

    def reshare(self, x: Shared, r: torch.Tensor | None) -> Shared:
        """Move the client's share into its preprocessed mask ``r`` (one message client -> server):
        afterwards the client holds ``r`` and the server ``x - r``, the form a linear layer wants
        (the client's product ``W r`` comes from the mask material). The server passes ``r=None``."""
        self.stats.shared_elements += x.c.numel()
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
        self.stats.revealed_elements += x.c.numel()
        if self.role == "server":
            self.transport.to_client(x.s)
            return None
        other = x.s if self.role is None else self.transport.from_server(tuple(x.shape))
        return self.decode(x.c + other)

    def open(self, xs: list[Shared]) -> list[torch.Tensor]:
        """One round: every value in ``xs`` opened to both parties."""
        return self._open_with(xs, torch.add)

    def _open_with(self, xs: list[Shared], combine) -> list[torch.Tensor]:
        """One round: each party sends its slot of every value in one message (arithmetic shares
        with ``combine=add``, XOR shares with ``bitwise_xor``)."""
        self.stats.rounds += 1
        self.stats.opened_elements += sum(x.c.numel() for x in xs)
        if self.transport is None:
            out = [combine(x.c, x.s) for x in xs]
        else:
            mine = [self._mine(x) for x in xs]
            theirs = self.transport.exchange(torch.cat([m.reshape(-1) for m in mine]))
            out, at = [], 0
            for m in mine:
                out.append(combine(m, theirs[at:at + m.numel()].view(m.shape)))
                at += m.numel()
        if self.view is not None:
            self.view += [o.clone() for o in out]
        return out

    # -- local operations ---------------------------------------------------------------------
    def trunc(self, x: Shared, k: int | torch.Tensor) -> Shared:
        return self.trunc_many([(x, k)])[0]

    def trunc_many(self, items: list[tuple[Shared, int | torch.Tensor]]) -> list[Shared]:
        """Truncation by ``k`` bits, exact up to one unit in the last place for ``|x| < 2^62``,
        all items in one round (see the module docstring: local shifts plus the wrap bit)."""
        if self.local_trunc:
            return [Shared(torch.bitwise_right_shift(x.c, k), -torch.bitwise_right_shift(-x.s, k)) for x, k in items]
        pairs, parts = [], []
        for x, k in items:
            k = torch.as_tensor(k, dtype=torch.int64)
            # the client adds 2^62: the value is now in [0, 2^63) (a party engine on the server adds it to
            # its don't-care c slot only; so do the public e&d and e*d terms of the Beaver products)
            uc = x.c + _OFFSET
            us = x.s
            mc, ms = _msb(uc), _msb(us)
            zero = torch.zeros_like(mc)
            pairs.append((Shared(mc, zero), Shared(zero.clone(), ms)))
            parts.append((k, _lsr(uc, k), _lsr(us, k), mc, ms))
        prods = self.mul_many(pairs, truncate=False) if pairs else []
        out = []
        for (k, lc, ls, mc, ms), pr in zip(parts, prods):
            # wrap bit w = mc OR ms = mc + ms - mc ms (known MSB 0 of the offset value)
            wc, ws = mc - pr.c, ms - pr.s
            top = torch.bitwise_left_shift(torch.ones_like(k), 64 - k)
            out.append(Shared(lc - wc * top - torch.bitwise_left_shift(torch.ones_like(k), 62 - k), ls - ws * top))
        return out

    def add_public(self, x: Shared, v: torch.Tensor | float) -> Shared:
        v = self.encode(torch.as_tensor(v))
        return Shared(x.c + v, x.s.clone() if v.dim() == 0 else x.s + torch.zeros_like(v))

    def mul_public(self, x: Shared, v: torch.Tensor | float, bits: int | None = None) -> Shared:
        """``x * v`` for a public real ``v`` (encoded with ``bits``, default F), truncated back."""
        bits = self.f if bits is None else bits
        e = self.encode(torch.as_tensor(v), bits)
        return self.trunc(Shared(x.c * e, x.s * e), bits)

    def mul_int(self, x: Shared, v: torch.Tensor | int) -> Shared:
        """``x * v`` for a public integer (e.g. a 0/1 mask): exact, no truncation."""
        v = torch.as_tensor(v, dtype=torch.int64)
        return Shared(x.c * v, x.s * v)

    def ring_matmul(self, W: ring.RingMatrix, x: Shared) -> Shared:
        """The simulator's linear layer: ``W x`` share by share (the protocol's ``W (x - r)`` and
        ``W r``, the same sum)."""
        return Shared(W.matmul(x.c), W.matmul(x.s))

    # -- Beaver products ------------------------------------------------------------------------
    def mul_many(self, pairs: list[tuple[Shared, Shared]], truncate: bool = True) -> list[Shared]:
        """All products in one round of openings."""
        triples = [self.provider.mul(x.shape).take() for x, _ in pairs]
        return self._beaver("mul", pairs, triples, truncate)

    def matmul_many(self, pairs: list[tuple[Shared, Shared]], truncate: bool = True) -> list[Shared]:
        triples = [self.provider.matmul(x.shape, y.shape).take() for x, y in pairs]
        return self._beaver("matmul", pairs, triples, truncate)

    def _beaver(self, kind, pairs, triples, truncate) -> list[Shared]:
        masked = []
        for (x, y), t in zip(pairs, triples):
            masked += [Shared(x.c - t.a[0], x.s - t.a[1]), Shared(y.c - t.b[0], y.s - t.b[1])]
        opened = self.open(masked)
        out = [Shared(*beaver.beaver_combine(kind, t, opened[2 * i], opened[2 * i + 1]))
               for i, t in enumerate(triples)]
        return self.trunc_many([(z, self.f) for z in out]) if truncate else out

    def mul(self, x: Shared, y: Shared) -> Shared:
        return self.mul_many([(x, y)])[0]

    def square(self, x: Shared) -> Shared:
        return self.mul(x, x)

    # -- comparison: A2B by a Kogge-Stone adder on XOR shares, MSB, B2A ---------------------------
    def _and_many(self, pairs: list[tuple[Shared, Shared]]) -> list[Shared]:
        """Bitwise AND of XOR-shared int64 words, all in one round."""
        triples = [self.provider.and_(x.shape).take() for x, _ in pairs]
        masked = []
        for (x, y), t in zip(pairs, triples):
            masked += [Shared(x.c ^ t.a[0], x.s ^ t.a[1]), Shared(y.c ^ t.b[0], y.s ^ t.b[1])]
        opened = self._open_with(masked, torch.bitwise_xor)
        out = []
        for i, t in enumerate(triples):
            e, d = opened[2 * i], opened[2 * i + 1]
            out.append(Shared(t.c[0] ^ (e & t.b[0]) ^ (d & t.a[0]) ^ (e & d), t.c[1] ^ (e & t.b[1]) ^ (d & t.a[1])))
        return out

    def ltz(self, x: Shared) -> Shared:
        """Arithmetic shares of the bit ``x < 0`` (the MSB of ``x_c + x_s``): 7 rounds of AND
        gates for the carry into bit 63 (Kogge-Stone over the two shares as XOR-shared
        addends), then one Beaver product to turn the XOR-shared bit into an additive one.
        Exact (no failure probability)."""
        zero = torch.zeros_like(x.c)
        X, Y = Shared(x.c, zero), Shared(zero, x.s)  # each party's share as an XOR-shared addend
        (G,) = self._and_many([(X, Y)])
        P = Shared(X.c ^ Y.c, X.s ^ Y.s)
        P0 = P
        for k in (1, 2, 4, 8, 16, 32):
            Gs = G.map(lambda t: torch.bitwise_left_shift(t, k))
            Ps = P.map(lambda t: torch.bitwise_left_shift(t, k))
            if k < 32:
                pg, pp = self._and_many([(P, Gs), (P, Ps)])
                P = pp
            else:
                (pg,) = self._and_many([(P, Gs)])
            G = Shared(G.c ^ pg.c, G.s ^ pg.s)  # G and P & G<<k are disjoint: OR = XOR
        msb = Shared(P0.c ^ torch.bitwise_left_shift(G.c, 1), P0.s ^ torch.bitwise_left_shift(G.s, 1))
        bc = torch.bitwise_right_shift(msb.c, 63) & 1
        bs = torch.bitwise_right_shift(msb.s, 63) & 1
        # b = bc XOR bs = bc + bs - 2 bc bs; bc bs by one Beaver product of (bc, 0) and (0, bs)
        (prod,) = self.mul_many([(Shared(bc, zero), Shared(zero.clone(), bs))], truncate=False)
        return Shared(bc - 2 * prod.c, bs - 2 * prod.s)

    def mul_bit(self, x: Shared, bit: Shared) -> Shared:
        (z,) = self.mul_many([(x, bit)], truncate=False)
        return z

    def relu(self, x: Shared) -> Shared:
        neg = self.ltz(x)
        return x - self.mul_bit(x, neg)

    def clip(self, x: Shared, lo: float, hi: float) -> Shared:
        """``min(max(x, lo), hi)``: both comparisons in the same rounds."""
        n = x.c.numel()
        both = cat([self.add_public(x, -hi).map(lambda t: t.reshape(-1)),
                    self.add_public(-x, lo).map(lambda t: t.reshape(-1))], 0)
        r = self.relu(both)
        over, under = r.map(lambda t: t[:n].reshape(x.shape)), r.map(lambda t: t[n:].reshape(x.shape))
        return x - over + under

    def max_last(self, x: Shared) -> Shared:
        """Max over the last dim by a tournament: ceil(log2 n) comparison layers."""
        while x.shape[-1] > 1:
            n = x.shape[-1]
            if n % 2:
                x = cat([x, x.map(lambda t: t[..., -1:])], -1)
                n += 1
            a, b = x.map(lambda t: t[..., 0:n:2]), x.map(lambda t: t[..., 1:n:2])
            x = b + self.relu(a - b)
        return x

    # -- nonlinear functions --------------------------------------------------------------------
    def exp(self, x: Shared, n: int = 8) -> Shared:
        """``exp(x)`` as ``(p(x/2^n))^(2^n)``, p the cubic Taylor polynomial: 2 + n rounds."""
        u = self.trunc(x, n)  # x / 2^n (exact shift of the fixed point)
        u2 = self.square(u)
        u3 = self.mul(u2, u)
        y = self.add_public(u + self.mul_public(u2, 0.5) + self.mul_public(u3, 1 / 6), 1.0)
        for _ in range(n):
            y = self.square(y)
        return y

    def reciprocal(self, x: Shared, iters: int = 14) -> Shared:
        """``1/x`` for x in [0.01, 500]: Newton from ``3 exp(0.5 - x) + 0.003``."""
        y = self.add_public(self.mul_public(self.exp(self.add_public(-x, 0.5)), 3.0), 0.003)
        for _ in range(iters):
            xy = self.mul(x, y)
            y = self.mul(y, self.add_public(-xy, 2.0))
        return y

    def rsqrt(self, x: Shared, lo: float, hi: float, iters: int | None = None) -> Shared:
        """``1/sqrt(x)`` for x in [lo, hi] by Newton. With ``rsqrt_guess`` (secure comparisons), from
        :meth:`_rsqrt_start`, within [y/2, y]: 6 iterations reach full precision (8 + 42 rounds);
        otherwise from the constant ``1/sqrt(hi)`` (31 iterations, 217 rounds, over a 1e9 range)."""
        if self.rsqrt_guess:
            y = self._rsqrt_start(x, lo, hi)
            iters = 6 if iters is None else iters
        else:
            y = self.add_public(Shared(torch.zeros_like(x.c), torch.zeros_like(x.s)), 1 / math.sqrt(hi))
            if iters is None:  # ~1.5x growth per step while far below, then quadratic
                iters = math.ceil(math.log(math.sqrt(hi / lo)) / math.log(1.5)) + 5
        for _ in range(iters):
            xy2 = self.mul(self.mul(x, y), y)  # (x y) y: y^2 alone has too few bits when y is small
            y = self.mul(y, self.mul_public(self.add_public(-xy2, 3.0), 0.5))
        return y

    def _rsqrt_start(self, x: Shared, lo: float, hi: float) -> Shared:
        """``1/sqrt(t_j)`` for the upper end ``t_j`` of x's interval among thresholds ``lo 4^i``
        (``t_n = hi``): one batch of comparisons ``b_i = [x < t_i]`` (8 rounds for all), then
        ``1/sqrt(hi) + sum_i b_i (1/sqrt(t_i) - 1/sqrt(t_{i+1}))`` is local. An underestimate by at
        most 2x, which Newton for rsqrt needs (it diverges from above ``sqrt(3)`` times the root)."""
        n = max(1, math.ceil(math.log(hi / lo) / math.log(4)))
        t = [lo * 4.0 ** i for i in range(1, n)] + [hi]
        y = self.add_public(Shared(torch.zeros_like(x.c), torch.zeros_like(x.s)), 1 / math.sqrt(hi))
        if n == 1:
            return y
        m = x.c.numel()
        bits = self.ltz(cat([self.add_public(x, -ti).map(lambda u: u.reshape(-1)) for ti in t[:-1]], 0))
        for i in range(n - 1):
            step = self.encode(torch.tensor(1 / math.sqrt(t[i]) - 1 / math.sqrt(t[i + 1])))
            y = y + self.mul_int(bits.map(lambda u: u[i * m:(i + 1) * m].reshape(x.shape)), step)
        return y

    def sigmoid(self, x: Shared) -> Shared:
        """x in [-16, 16]: ``e^{x/2} / (e^{x/2} + e^{-x/2})`` with the denominator scaled into
        the reciprocal's range."""
        if self.clip_sigmoid:
            x = self.clip(x, -16.0, 16.0)
        h = self.trunc(x, 1)
        both = self.exp(cat([h, -h], 0))
        ep, em = both.map(lambda t: t[:h.shape[0]]), both.map(lambda t: t[h.shape[0]:])
        d = self.mul_public(ep + em, 1 / 32)  # [2, 6000] -> [1/16, 190]
        return self.mul_public(self.mul(ep, self.reciprocal(d)), 1 / 32)

    def silu(self, x: Shared) -> Shared:
        return self.mul(x, self.sigmoid(x))

    def gelu_tanh(self, x: Shared) -> Shared:
        x3 = self.mul(self.square(x), x)
        z = self.mul_public(x + self.mul_public(x3, 0.044715), 2 * math.sqrt(2 / math.pi))
        # 0.5 x (1 + tanh(z/2)) = x sigmoid(z)
        return self.mul(x, self.sigmoid(z))

    def softmax(self, x: Shared, mask: torch.Tensor | None = None, shift: float = 0.0) -> Shared:
        """Softmax over the last dim. ``mask``: public 0/1 (1 = allowed) of x's shape."""
        n = x.shape[-1]
        if self.exact_max:  # x - max(x) <= 0: exp's range is safe whatever the scores' spread
            big = torch.zeros(x.shape, dtype=torch.float64)
            if mask is not None:
                big = big.masked_fill(~mask, -1e4)  # masked keys can never be the max
            m = self.max_last(self.add_public(x, big))
            e = self.exp(x - m.map(lambda t: t.expand(x.shape)))
            if mask is not None:
                e = self.mul_int(e, mask.to(torch.int64))
            # the sum lies in [1, n]: /16 puts it inside the reciprocal's range for n <= 8000
            r = self.mul_public(self.reciprocal(self.mul_public(e.sum(-1, keepdim=True), 1 / 16)), 1 / 16)
            return self.mul(e, r.map(lambda t: t.expand(x.shape)))
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
        return self.mul(e, r.map(lambda t: t.expand(x.shape)))


# -- linear layers on shares and the plan executor (simulated two parties) --------------------
WEIGHT_BITS = 16  # a row encodes as round(W * 2^k_j), k_j <= WEIGHT_BITS: products stay below 2^(F+16) per unit


def encode_weights_pow2(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (out, in) -> (int64 weights, per-row public shifts k_j)."""
    w = w.to(torch.float64)
    peak = w.abs().amax(dim=1).clamp_min(1e-30)
    k = torch.clamp(torch.floor(torch.log2(ring.WMAX / peak)), max=WEIGHT_BITS).to(torch.int64)
    w_int = torch.round(w * torch.pow(2.0, k.to(torch.float64))[:, None]).to(torch.int64)
    return w_int.clamp_(-ring.WMAX, ring.WMAX), k


def mpc_matrices(model) -> dict[str, tuple[ring.RingMatrix, torch.Tensor]]:
    from .masked import _cached, unit_weight, units_for

    def make():
        out = {}
        for name, u in units_for(model.plan, "v3").items():
            w_int, k = encode_weights_pow2(unit_weight(u, model.weights))
            out[name] = (ring.RingMatrix(w_int), k)
        return out
    return _cached(model, ("mpc-matrices",), make)


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

    def linear(self, ops, x: Shared) -> list[Shared]:
        key = ops[0].fuse_group if ops[0].fuse_group else ops[0].name
        W, k = self.mats[key]
        if self.e.role is None:  # simulator: the same products, both slots here
            y = self.e.ring_matmul(W, x)
        elif self.e.role == "client":  # re-share into the mask r; W r is preprocessed: no product online
            r, wr = self.store.take(key, x.shape[0])
            self.e.reshare(x, r)
            y = Shared(wr, torch.zeros_like(wr))
        else:  # the server multiplies its share x - r by the ring weights on its device
            x = self.e.reshare(x, None)
            y = Shared(torch.zeros(x.shape[0], W.out_dim, dtype=torch.int64), W.matmul(x.s).cpu())
        y = self.e.trunc(y, k)
        outs, at = [], 0
        for op in ops:
            part = y.map(lambda t: t[:, at:at + op.out_dim])
            at += op.out_dim
            if op.bias:
                part = self.e.add_public(part, self.model.weights[op.bias].to(torch.float64))
            outs.append(part)
        return outs

    def norm(self, step, x: Shared) -> Shared:
        """RMSNorm / LayerNorm on shares. ``S = sum x^2`` is formed from ``x / 2^8`` squared without
        truncation (scale 2^2F) and summed before one truncation by ``F - 16`` bits, so elements up
        to ~2^14 neither overflow the ring nor lose small rows' precision; ``1/sqrt(d)`` is folded
        into the public weight: ``x rsqrt(mean x^2 + eps) = sqrt(d) x rsqrt(S + d eps)``."""
        e, w = self.e, self.model.weights
        d = x.shape[-1]
        if step.kind == "layer":
            x = x - e.mul_public(x.sum(-1, keepdim=True), 1 / d).map(lambda t: t.expand(x.shape))
        xs = e.trunc(x, 8)
        (sq,) = e.mul_many([(xs, xs)], truncate=False)
        S = e.add_public(e.trunc(sq.sum(-1, keepdim=True), e.f - 16), d * step.eps)
        r = e.rsqrt(S, d * self.ranges.norm_lo, d * self.ranges.norm_hi)
        y = e.mul(x, r.map(lambda t: t.expand(x.shape)))
        y = e.mul_public(y, w[step.weight].to(torch.float64) * math.sqrt(d))
        if step.bias:
            y = e.add_public(y, w[step.bias].to(torch.float64))
        return y

    def attention(self, step, q: Shared, k: Shared, v: Shared) -> Shared:
        e = self.e
        T, start = q.shape[0], self.length
        end = start + T
        H, KV, D = step.n_heads, step.n_kv_heads, step.head_dim
        q = q.map(lambda t: t.view(T, H, D).transpose(0, 1))
        k = k.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        v = v.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        if step.rope:
            cos, sin = (t.to(torch.float64) for t in self.rope.tables(start, end))
            half = D // 2

            def rot(s: Shared) -> Shared:
                return s.map(lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1))

            q = e.mul_public(q, cos) + e.mul_public(rot(q), sin)
            k = e.mul_public(k, cos) + e.mul_public(rot(k), sin)
        if step.layer in self.k_cache:
            k = cat([self.k_cache[step.layer], k], 1)
            v = cat([self.v_cache[step.layer], v], 1)
        self.k_cache[step.layer], self.v_cache[step.layer] = k, v
        group = H // KV
        q = q.map(lambda t: t.reshape(KV, group * T, D))
        (scores,) = e.matmul_many([(q, k.map(lambda t: t.transpose(1, 2)))])
        scores = e.mul_public(scores, 1 / math.sqrt(D))
        kpos = torch.arange(end)[None, :]
        qpos = torch.arange(start, end)[:, None]
        allowed = kpos <= qpos
        window = self.model.config.sliding_window
        if window is not None:
            allowed &= kpos > qpos - window
        mask = allowed[None].expand(group, T, end).reshape(group * T, end)[None].expand(KV, group * T, end)
        probs = e.softmax(scores, mask=mask, shift=self.ranges.softmax_shift)
        (out,) = e.matmul_many([(probs, v)])
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
                for op, out in zip(ops, self.linear(tuple(ops), env[step.inp])):
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
                env[step.out] = self.norm(step, env[step.inp])
            elif isinstance(step, Attention):
                env[step.out] = self.attention(step, env[step.q], env[step.k], env[step.v])
            elif isinstance(step, Add):
                env[step.out] = env[step.inputs[0]] + env[step.inputs[1]]
            elif isinstance(step, Activation):
                if step.kind == "silu_gate":
                    env[step.out] = e.mul(e.silu(env[step.inputs[0]]), env[step.inputs[1]])
                else:
                    env[step.out] = e.gelu_tanh(env[step.inputs[0]])
            else:
                raise TypeError(f"not a plan step: {step!r}")
            i += 1
        self.length += n_tokens
        logits = e.reveal(env["logits"])
        return None if logits is None else logits.to(torch.float32)
