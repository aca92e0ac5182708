"""The v3-mpc engine: sharing, openings, rounds of products, truncation.

:class:`Engine` without a transport is a *two-party simulator* (both shares in one process; what
the accuracy tests measure). With a transport it is *one party* of the networked ``v3-mpc``
protocol (service.py): it holds only its own share, and every opening is one message each way
with the other party (all openings of a step batched into that one round), the client's input
and linear-layer re-shares are one-way messages, and only the logits are revealed, to the
client. Triples: the client as seeded dealer (:class:`beaver.SeededDealerProvider`) or joint
IKNP/Gilboa generation over the session channel (:class:`beaver_ot.NetOTProvider`, AND triples
from random OT). This module is the core; the comparisons (compare.py) and the nonlinear
approximations (approx.py) are mixins of :class:`Engine` built on its rounds.

Rounds. :meth:`Engine.run` opens every Beaver product, matrix product and truncation wrap bit
of one step in one round; public factors and powers of two are folded into the truncation
that follows a product (``("mul", x, y, F + s, v)``: ``x y v / 2^(F+s)``) instead of costing a
round each, and operations take ``also`` items that ride in their first round (e.g. ``e @ V``
in the reciprocal's first product, ``gate * up`` in the clip's last round). A truncation
needs one product (its wrap bit, below) and so a round; a product's truncation asked for as
``Lazy(k)`` is kept as that unevaluated polynomial (poly.py) and multiplied out in the round of
the product that takes it as a factor, so a chain of products costs one round per product, not
two (exp's squarings, the Newton and reciprocal factors, the norm, the sigmoid). Likewise a
comparison's last step (XOR to additive, one product) rides in the round of the product that
uses the bit (compare.py).

Encoding. A real ``x`` is the ring element ``round(x * 2^F)`` (``F = FRAC_BITS``;
``ring.FixedPoint.encode``), read as a signed int64; shares ``x = x_c + x_s mod 2^64``.

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
"""

from __future__ import annotations

import dataclasses

import torch

from .. import ring
from . import beaver, poly
from .approx import Approx
from .compare import Compare
from .poly import Poly, ring_int
from .shares import ClientBit, Lazy, ServerBit, Shared, _lsr, _msb
from .void import VOID, real

FRAC_BITS = 20
_OFFSET = 1 << 62


# an opening's message: values by lane width, then the one-sided bits (Engine._open_with)
_OPEN_LAYOUT = [(w, "both") for w in (1, 16, 32, 64)] + [(1, "client"), (1, "server")]


@dataclasses.dataclass
class Stats:
    rounds: int = 0            # openings rounds (each a message each way)
    opened_elements: int = 0   # ring elements opened (each costs 8 bytes each way)
    shared_elements: int = 0   # ring elements re-shared by the client (client -> server)
    revealed_elements: int = 0  # ring elements revealed to the client (logits only)


class Engine(Compare, Approx):
    """The share arithmetic, as a two-party simulator or as one party of the networked protocol.

    ``transport=None``: the simulator, both shares in one process, openings counted as rounds.
    With a ``transport`` (``role`` "client" or "server"), this process is one party: of every
    :class:`Shared` only its own slot (``c`` for the client, ``s`` for the server) is real; the
    other slot is :data:`void.VOID`, on which every operation is free (protocols/mpc/void.py: the
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
        """A real ``x`` as the ring element ``round(x 2^bits)`` (default ``bits = F``)."""
        return ring.FixedPoint.encode(x, self.f if bits is None else bits)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        return ring.FixedPoint.decode(v, self.f)

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
        product that takes it as a factor does that product in its own round (protocols/mpc/poly.py)."""
        L, mc, ms, top = self._trunc_terms(x, k)
        zero = torch.zeros_like(real(mc, ms))  # a real 0: the other party's share of its own bit
        # wrap bit w = mc OR ms = mc + ms - mc ms (known MSB 0 of the offset value)
        return Poly([L, ClientBit(mc, zero), ServerBit(zero.clone(), ms)],
                    {(0,): 1, (1,): -top, (2,): -top, (1, 2): top}, source=(x, k))

    def _trunc_terms(self, x: Shared, k: int | torch.Tensor):
        """The truncation of ``x`` by ``k`` as ``L - top (mc + ms - mc ms)`` (module docstring):
        ``(L, mc, ms, top)`` with L the shifted shares less the offset, mc / ms each party's own MSB
        (VOID in the other party's engine) and top = 2^(64-k) (an int, or per element)."""
        if not isinstance(k, int):
            k = torch.as_tensor(k, dtype=torch.int64)
            k = int(k) if k.dim() == 0 else k
        # the client adds 2^62: the value is now in [0, 2^63) (a party engine on the server adds it to
        # its don't-care c slot only)
        uc = x.c + _OFFSET
        us = x.s
        if isinstance(k, int):
            top, off = ring_int(1 << (64 - k)), 1 << (62 - k)
        else:
            top = torch.bitwise_left_shift(torch.ones_like(k), 64 - k)
            off = torch.bitwise_left_shift(torch.ones_like(k), 62 - k)
        return Shared(_lsr(uc, k) - off, _lsr(us, k)), _msb(uc), _msb(us), top

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
