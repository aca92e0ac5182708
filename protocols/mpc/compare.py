"""Secure comparison on shares (``ltz``) and what is built on it: ReLU, clip, the row max.

``ltz``: A2B of the two shares by a Kogge-Stone adder over XOR shares (each party's share an
XOR-shared addend) with boolean AND triples, the sign bit read from the sum, then B2A by one
Beaver product; exact. That last step (XOR to additive) can ride in the round of the product
that uses the bit (``ltz(lazy=True)``: relu, the max's winner products, the sigmoid's clip).
With a public bound the carry runs over fewer bits (5 AND rounds instead of 7 for |x| < 4000
with 1/8 slack, 6 exact), and its AND openings carry only those bits (packed 4 to a ring
element for p <= 16).

The row max (the softmax's, with ``Ranges.comparisons``) is exact: groups of up to 32 keys
compare all their pairs in one batch and the winner's bits are multiplied up to 8 at once
(8 rounds for up to 17 keys; a binary tournament takes 9 per halving).

:class:`Compare` is a mixin of :class:`engine.Engine`: it runs on the engine's rounds
(``run``, ``_open_with``, the provider's AND triples).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .poly import Poly
from .shares import ClientBit, ServerBit, Shared, _lsr, cat
from .void import real


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


class Compare:
    """Comparisons on shares, a mixin of :class:`engine.Engine` (see the module docstring)."""

    # comparisons of values known to lie within +-CMP_BOUND (activations, score differences): 5 AND
    # rounds instead of 7, at the price of reading 0 <= x < CMP_SLACK as negative (see ltz)
    CMP_BOUND, CMP_SLACK = 4000.0, 1 / 8
    # the max's winner indicator: at most this many shared bits multiplied in one round (2^8 mask
    # products per element, 2^9 with the value it selects)
    _MAX_FACTORS = 8

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
        bc, bs = self.ge_bits(x, bound, slack, scale)
        return self._b2a(bc, bs, zero, also, lazy)

    def ge_bits(self, x: Shared, bound: float | None = None, slack: float | None = None,
                scale: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """XOR shares (client's, server's) of the bit ``x >= 0``, as :meth:`ltz` computes it before
        its XOR-to-additive step (same ``bound``, ``slack``, ``scale``)."""
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
        return self._sum_bit(xc, xs, p)

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
