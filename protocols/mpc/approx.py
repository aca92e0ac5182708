"""The nonlinear approximations on shares: exp, reciprocal, rsqrt, sigmoid, SiLU, GELU, softmax.

Each function's docstring gives its input range, its error and its rounds (the tolerances and
round counts tests/test_mpc_units.py checks). With secure comparisons (``Ranges.comparisons``,
what real models need: the engine's ``clip_sigmoid``, ``rsqrt_guess`` and ``exact_max``) the
ranges are wide and the round counts low; without, each function runs for a fixed public range.

- ``exp``: the limit form ``p(x/2^n)^(2^n)``, p a degree-4 (or 6) Taylor polynomial whose
  coefficients are folded into the products' truncations, then n squarings, each product's
  truncation riding in the next product's round (engine.py: Rounds). The softmax raises p(u) to
  the 162nd power by four cubings (a product of three factors is one round: y^3 <= 1 at scale
  2^3F stays in the ring) and a squaring.
- ``reciprocal``: without comparisons Newton ``y <- y (2 - x y)`` from ``3 exp(0.5 - x) + 0.003``.
  With comparisons one batch of bounded comparisons against thresholds ``lo 2^(i/per_octave)``
  picks a start for x's interval, so ``e = 1 - x y0`` is small, and
  ``y0 (1+e)(1+e^2)...(1+e^(2^(s-1)))`` has relative error ``e^(2^s)``. The sigmoid's
  ``1/(1 + t)`` over [1, 2.14] needs no comparison (one interval, a public start).
- ``rsqrt``: without comparisons Newton ``y <- y (3 - x y^2) / 2`` from ``1/sqrt(hi)``. With
  comparisons 16 thresholds per octave give ``y0`` and, as the same one-hot sum of constants,
  ``y0^2``; then one Newton step. The norm multiplies ``x w sqrt(d)`` by ``y0`` in the round of
  ``x y0^2`` instead of forming ``1/sqrt``.
- ``sigmoid``: without comparisons ``e^{x/2} / (e^{x/2} + e^{-x/2})``. With comparisons the input
  is clipped to [-16, 16] (two ReLUs in the same rounds as the sign ``s``), ``t = e^{-min(|x|,
  16)}`` (one exponential of a non-positive value) and ``sigmoid = (1 - s (1 - t)) / (1 + t)``
  (no cancellation for large negative x), so SiLU is accurate for any gate value (SmolLM2's
  reach 49). SiLU is ``x sigmoid(x)``, the gated MLP's ``gate * up`` rides in the round after
  the comparisons, GELU(tanh) goes through ``0.5 (1 + tanh(z)) = sigmoid(2z)``.
- ``softmax``: with comparisons the exact row max (compare.py), so exp only sees x - max <= 0
  and the sum lies in [1, n]; ``(e @ V) / sum`` with ``e @ V`` in the reciprocal's first round.
  Without comparisons: scores minus their row mean. Masked keys (causal / sliding window) are
  multiplied by public 0/1 (and get -2000 for the max).

:class:`Approx` is a mixin of :class:`engine.Engine`, built on its products and on
:class:`compare.Compare`.
"""

from __future__ import annotations

import math

import torch

from .poly import Poly
from .shares import Lazy, LazySum, Shared, cat


def _thresholds(lo: float, hi: float, per_octave: float) -> torch.Tensor:
    """Interval ends ``lo 2^(i/per_octave)`` up to ``hi`` (the last one is ``hi``); ``per_octave=0``:
    the one interval [lo, hi]. An interval start for Newton comes from one comparison per inner end."""
    rho = 2.0 ** (1 / per_octave) if per_octave else hi / lo
    m = max(1, math.ceil(math.log(hi / lo) / math.log(rho) - 1e-9))
    return torch.tensor([lo * rho ** i for i in range(m)] + [hi], dtype=torch.float64)


def _minus_each(x: Shared, t: torch.Tensor) -> Shared:
    """``x - t_i`` for each public ring value ``t_i``, flat and threshold-major (one comparison batch)."""
    n = t.numel()
    return Shared((x.c.reshape(1, -1) - t.view(-1, 1)).reshape(-1), x.s.reshape(1, -1).expand(n, -1).reshape(-1))


def _interval_const(bits: Shared, consts: torch.Tensor, shape, base: Shared | None = None) -> Shared:
    """The public constant ``c_j`` of x's interval j (of m) from the bits ``b_i = [x < t_i]``,
    i = 1..m-1, threshold-major: ``c_m + sum_i b_i (c_i - c_(i+1))``, local. With ``base`` (= c_m x)
    and the products ``x b_i`` in place of the bits: ``c_j x``."""
    d = (consts[:-1] - consts[1:]).view(-1, 1)
    c = (bits.c.view(d.shape[0], -1) * d).sum(0).view(shape)
    s = (bits.s.view(d.shape[0], -1) * d).sum(0).view(shape)
    return Shared(c + consts[-1], s) if base is None else Shared(c + base.c, s + base.s)


class Approx:
    """The nonlinear functions on shares, a mixin of :class:`engine.Engine` (see the module docstring)."""

    _DIV_BITS = 32  # x / N for a public integer N as x round(2^32 / N) / 2^32 (|x| < CMP_BOUND: below 2^57)

    def exp(self, x: Shared, n: int = 8, pre: int = 0, deg: int = 4, also: list[tuple] = (),
            given_u: bool = False, post: int = 0, lazy: bool = False, cubes: int = 0) -> Shared | Poly | tuple:
        """``exp(x / 2^pre)`` as ``(p(u))^(2^n)``, ``u = x / 2^(n + pre)`` (a truncation forced in
        the round of u^2, in which the single-round items ``also`` ride; ``given_u``: x is u
        already), p the Taylor polynomial of degree ``deg`` (4 or 6) with its coefficients folded
        into the products' truncations (u^2/2; u^3/6 and u^4/24 side by side; for deg 6 then
        u^5/120 and u^6/720; the terms beyond u^2/2 are summed untruncated and truncated once). Each
        product's truncation rides in the next product's round (lazy truncations, protocols/mpc/poly.py):
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

    def reciprocal(self, x: Shared, lo: float = 0.01, hi: float = 500.0, cmp: bool = False, num_bits: int = 0,
                   per_octave: float = 1, steps: int = 3, also: list[tuple] = (), iters: int = 14,
                   lazy: bool = False):
        """``2^num_bits / x`` for x in [lo, hi].

        ``cmp=False``: Newton ``y <- y (2 - x y)`` from ``3 exp(0.5 - x) + 0.003`` (x in [0.01, 500],
        num_bits 0, 14 iterations, ~80 rounds): rel. err < 1e-3.

        ``cmp=True`` (secure comparisons): x's interval among thresholds ``lo 2^(i/per_octave)`` by one
        batch of comparisons (:meth:`ltz`, bounded by ``1.25 hi``, slack ``lo/16``: 6 rounds when
        ``hi <= 3200 lo``-ish), start ``y0 = kappa 2^num_bits / t_j`` at the interval's upper end with
        ``kappa = 2r/(1+r)`` (r the interval's ratio), so ``e = 1 - x y0 / 2^num_bits`` lies within
        ``+-(r-1)/(r+1)`` (1/3 for octaves); then ``y (1+e)(1+e^2)...(1+e^(2^(steps-1)))`` =
        ``(1 - e^(2^steps)) / x``: relative error ``|e|^(2^steps)`` in ``2 + steps`` rounds, each
        truncation riding in the next product's round (octaves, steps 3: (1/3 + 1/24)^8 < 4e-4, 11
        rounds in all; ``lazy``: the result is its last truncation's :class:`Poly`, one round less).
        ``per_octave=0``: one interval, [lo, hi], no comparisons (``|e| <= (hi - lo)/(hi + lo)``; the
        sigmoid's [1, 2.14]: 0.36, steps 3: < 3e-4). ``also``: items of :meth:`run` riding in the
        first product's round; the result is then ``(y, their outputs)``."""
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
        ``F + num_bits`` (for :meth:`reciprocal_refine`), else None.

        Range and error: x in [lo, hi]; ``e = 1 - x y0 / 2^num_bits`` within ``+-(r-1)/(r+1)`` (r the
        intervals' ratio, 2^(1/per_octave): 1/3 for octaves) plus the comparisons' slack ``lo/16``."""
        t = _thresholds(lo, hi, per_octave)
        m = len(t) - 1
        num, slack = 2.0 ** num_bits, lo / 16
        # the comparisons may put x up to ``slack`` above t_j into interval j: centre y0 on [t_{j-1}, t_j + slack]
        ys = self.encode(2 * num / (t[:-1] + t[1:] + torch.where(torch.arange(m) < m - 1, slack, 0.0)))
        src, k = x.source if isinstance(x, Poly) else (x, 0)
        if m == 1:
            return Shared(torch.zeros_like(src.c) + ys[0], torch.zeros_like(src.s)), None, \
                self.run(list(also)) if also else []
        cmp = _minus_each(src, self.encode(t[1:m], self.f + k))
        if not isinstance(x, Poly):
            bits, rest = self.ltz(cmp, bound=1.25 * hi, slack=slack, also=also) if also else \
                (self.ltz(cmp, bound=1.25 * hi, slack=slack), [])
            return _interval_const(bits, ys, src.shape), None, rest
        bits = self.ltz(cmp, bound=1.25 * hi, slack=slack, scale=k, lazy=True)
        xe = x.map(lambda u: u.reshape(1, -1).expand(m - 1, -1).reshape(-1))  # threshold-major, as the bits
        xb, b, xv, *rest = self.run([("mul", xe, bits, None), ("force", bits), ("force", x)] + list(also))
        xy0 = _interval_const(xb, ys, src.shape, base=self.mul_int(xv, ys[-1]))
        return _interval_const(b, ys, src.shape), self.lazy_trunc(xy0, self.f + num_bits), rest

    def reciprocal_refine(self, x: Shared | Poly, y0: Shared, num_bits: int, steps: int, also: list[tuple] = (),
                          lazy: bool = False, p: Poly | None = None) -> tuple[Shared | Poly, list[Shared]]:
        """:meth:`reciprocal`'s products from the start ``y0``: ``also`` rides in the first one's
        round. ``p``: the first product ``x y0 / 2^(F + num_bits)`` already made (lazy), by
        :meth:`reciprocal_start`; ``also`` then rides in the next round.

        Range and error: a start with ``|e| < 1`` (``e = 1 - x y0 / 2^num_bits``) gives ``2^num_bits / x``
        with a relative error ``|e|^(2^steps)``."""
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
        217 rounds, over a 1e9 range); tests/test_mpc_units.py checks rel. err < 1e-3 (plus 1e-4
        absolute) on [1e-2, 1e2] both ways."""
        if self.rsqrt_guess:
            G = 18
            t = _thresholds(lo, hi, per_octave)
            m = len(t) - 1
            sr = (t[1:] / t[:-1]).sqrt()
            cs = self.encode(2 * sr / (1 + sr) / t[1:].sqrt())  # interval j's start, j = 1..m
            ws = self.encode(self.decode(cs) ** 2, self.f + G)  # its square, G more fraction bits
            if m > 1:
                cmp = _minus_each(x, self.encode(t[1:m], self.f + extra))
                if extra:  # x's truncation to scale 2^F rides in the comparisons' last round
                    bits, (x,) = self.ltz(cmp, also=[("trunc", x, extra)])
                else:
                    bits = self.ltz(cmp)
                y0, w0 = _interval_const(bits, cs, x.shape), _interval_const(bits, ws, x.shape)
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
        a product of three), and ``(times g) / (1 + t)``: 17 rounds for SiLU. The sign may read
        0 <= x < CMP_SLACK as negative (see :meth:`ltz`): the formula is exact for either sign, and
        then t <= e^{CMP_SLACK}, inside the reciprocal's range. One exponential of a non-positive
        argument and 3 comparisons per element in all. ``|times| < 2^14`` keeps ``times g / (1 + t)``
        at scale 2^2F below 2^62. Error: abs. err < 3e-4 for any x with |x| < ~3900.
        Without comparisons: ``e^{x/2} / (e^{x/2} + e^{-x/2})`` from ``h = x/2`` with the
        exp-started reciprocal, for x in [-16, 16] (see :meth:`silu` for its error)."""
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
        """``x sigmoid(x)``. With comparisons for any |x| < ~3900 (17 rounds), without for x in
        [-16, 16]; abs. err < 2e-3 (plus 3e-4 relative) in both cases (tests/test_mpc_units.py checks
        [-60, 60] and [-16, 16])."""
        return self.sigmoid(x, times=x)

    def silu_gate(self, x: "Shared | LazySum", up: "Shared | LazySum") -> Shared:
        """``silu(x) * up = sigmoid(x) * (x up)``: the product x up rides in the clip's last round.
        As LazySums (the gate_up layer's untruncated outputs; with comparisons): their truncations
        ride in that round too (:meth:`sigmoid`'s ``untrunc``).

        Range: x as for :meth:`silu`, ``|x up| < 2^14``; error: silu's times ``|up|`` (the tests: within
        ``2e-3 (1 + |up|)`` plus 3e-4 relative), in silu's 17 rounds."""
        if isinstance(x, LazySum):
            # shifts at full shape: the Poly's tensor coefficients then follow its reshapes
            xp, upp = (self.lazy_trunc(z.src, z.k.expand(z.src.shape)) for z in (x, up))
            return self.sigmoid(xp, times=0, also=[("mul", xp, upp, None)], untrunc=(x.src, x.k))
        return self.sigmoid(x, times=0, also=[("mul", x, up, None)])

    def gelu_tanh(self, x: Shared) -> Shared:
        """GELU (tanh form) as ``0.5 x (1 + tanh(z/2)) = x sigmoid(z)`` with
        ``z = 2 sqrt(2/pi) (x + 0.044715 x^3)``. For x in [-4, 4] only; abs. err < 5e-4 there
        (tests/test_mpc_units.py; 23 rounds with comparisons)."""
        x3 = self.mul(self.square(x), x)
        z = self.mul_public(x + self.mul_public(x3, 0.044715), 2 * math.sqrt(2 / math.pi))
        return self.sigmoid(z, times=x)

    def softmax(self, x: Shared, mask: torch.Tensor | None = None, shift: float = 0.0,
                values: Shared | None = None) -> Shared:
        """Softmax over the last dim (``softmax(x) @ values`` with ``values``). ``mask``: public 0/1
        (1 = allowed) of x's shape.

        With ``exact_max`` (comparisons), for score spreads below ~440 (exp's range; SmolLM2's
        spread is < 60 on the accuracy text): masked keys get -2000 (never the max; their terms are
        multiplied by 0); the exact row max m (:meth:`max_last_scaled`) also gives ``x/162`` and
        ``m/162``, so exp's ``u = (x - m)/162 <= 0`` costs no round, and exp is ``p(u)^162``
        (:meth:`exp`: rel. err < 1e-3 on [-12, 0.5], within 1e-5 of 0 down to -440); the sum s lies
        in [1, n] up to exp's error; ``2^nb / s`` by the comparison-started reciprocal (4 thresholds
        per octave, so ``|e| <= 0.09``, two factors: error < 1e-4), with ``e @ values`` riding in its
        first product; then ``(e @ values) (2^nb / s)`` truncated by F + nb (nb <= 8 fraction bits
        more for 1/s: |values| < 2^13).

        Without comparisons: scores minus their row mean (and ``shift``), for rows of at most 64
        keys whose centred scores stay below ~6 (the reciprocal's range). Error, either way: within
        1e-4 + 5e-3 relative of each probability (exp's relative error in each numerator and in the
        sum, the reciprocal's, the truncations; tests/test_mpc_units.py, which also counts 33 rounds
        for 64 keys with ``values`` and comparisons)."""
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
        # keys and centred scores up to ~6 (see the docstring)
        cnt = mask.sum(-1, keepdim=True).to(torch.float64) if mask is not None else torch.tensor(float(n))
        r = self.mul_public(self.reciprocal(self.mul_public(e.sum(-1, keepdim=True), 1 / cnt)), 1 / cnt)
        probs = self.mul(e, r.map(lambda t: t.expand(x.shape)))
        return probs if values is None else self.matmul_many([(probs, values)])[0]
