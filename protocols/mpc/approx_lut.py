"""v3-ot's nonlinear steps on the v3-mpc engine: lookup tables (lut.py) where v3-mpc runs
polynomial and iterative approximations, products and comparisons as in v3-mpc with OT triples.

:class:`LutEngine` is :class:`engine.Engine` with these overrides (everything else, the linear
layers and the plan executor included, is v3-mpc's):

- ``softmax``: the exact row max (compare.py), ``x - max`` clipped below at -16 by one bounded
  relu, exp by its table (one round), the sum ``s`` in [1, n], ``1/s`` started by a reciprocal
  table over [0.99, 1.01 n] and refined by Newton ``y (2 - s y)`` (one step squares the table's
  relative error ``w``; steps until it is below 1e-4), ``e @ values`` riding in the first Newton
  product.
- ``silu_gate``: ``x`` clipped to [-15.875, 15.875] (the comparisons; the bounded clip may let
  1/8 more through, still inside the table), ``x up`` riding in the clip's last
  round, sigmoid by its table, one product: ``sigmoid(x) (x up)``.
- ``gelu_tanh``: ``x`` clipped to [-7.875, 7.875], the gate ``gelu(x)/x`` by a table (0 and 1 within 1e-14 at
  the clip points, so the clip costs no accuracy), one product ``x gate``.

- ``rsqrt`` (the norms'; range d 1e-3 .. d 1e6, too wide for one uniform table): an exponent/
  mantissa split. The exponent by one batch of exact comparisons against the powers of four
  ``4^i`` inside [lo/2, 2 hi] (16 for SmolLM2, where v3-mpc's start compares against 16 thresholds
  per octave: 478), so x lies in ``[4^j, 4^(j+1))``; the bits stay lazy and ride in the round of
  the products ``x b_i``, whose one-hot sum with the public ``c_j = 4^-j`` (exact: powers of two)
  is the mantissa ``m = x c_j`` in [1, 4), untruncated (the table's own local truncation takes
  any scale). ``rsqrt(m)`` by the table ``rsqrt_mantissa`` (k = 13: relative error < 1.9e-4),
  then ``1/sqrt(x) = rsqrt(m) 2^-j`` by one product with the one-hot ``2^-j`` (untruncated, at
  scale 2^(F+12): its smallest values keep their bits), and ``times`` by one product with that,
  truncated. No Newton step: the table alone meets v3-mpc's accuracy. Per row: 16 comparisons,
  one 1-of-8192 lookup, 11 opening rounds and one OT round (v3-mpc: 478 comparisons, 11 rounds);
  ``times`` costs three d-wide products (its truncation, the product, the product's truncation)
  instead of v3-mpc's fifteen. Measured per SmolLM2 norm row (d = 576, ``OTProvider.ot_bytes``):
  5.97 MB instead of 39.8 MB, 5.3 MB of it the d-wide products. (Tables for all 16 intervals,
  looked up on x itself before the comparisons, would save the OT round for ~1 MiB more per row;
  a smaller table plus a Newton step would cost two more rounds.)

What stays v3-mpc's, plainly: the comparisons themselves (Kogge-Stone over AND triples from OT).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import lut
from .approx import _interval_const, _minus_each
from .engine import Engine
from .poly import Poly
from .shares import LazySum, Shared

# below 1e-4 relative after Newton: enough next to the tables' own errors
_RECIPROCAL_REL = 1e-4
# rsqrt's 1/sqrt(x) (times' factor) at scale 2^(F + _RSQRT_G): 1/sqrt(d 1e6) ~ 4e-5 keeps ~2^17 units;
# ``times / sqrt(x)`` at scale 2^(2F + G) must stay below 2^62: |times / sqrt(x)| < 2^10 (a norm's
# is at most |w| sqrt(d), SmolLM2's ~2^7)
_RSQRT_G = 12


@functools.lru_cache(maxsize=None)
def reciprocal_table(n: int) -> lut.Table:
    """1/s over [0.99, 1.01 n] (a softmax sum of n terms, the largest exp(0) = 1)."""
    return lut.Table("reciprocal", lambda x: 1 / x, 0.99, 1.01 * max(n, 2), 12)


class LutEngine(Engine):
    """The v3-mpc engine with v3-ot's table lookups for exp, reciprocal, sigmoid, GELU and rsqrt."""

    def __init__(self, provider, **kw):
        super().__init__(provider, **kw)
        self.lookups = 0  # elements looked up (each one 1-of-2^k OT)

    def table(self, x: Shared, t: lut.Table) -> Shared:
        self.lookups += x.numel()
        return lut.on_shares(self, x, t)

    def _value(self, x: Shared | LazySum) -> Shared:
        """A LazySum's value (its truncation: one round)."""
        if not isinstance(x, LazySum):
            return x
        (v,) = self.trunc_many([(x.src, x.k.expand(x.src.shape))])
        return v if x.h is None else x.h + v

    def softmax(self, x: Shared, mask: torch.Tensor | None = None, shift: float = 0.0,
                values: Shared | None = None) -> Shared:
        n = x.shape[-1]
        big = torch.zeros(x.shape, dtype=torch.float64)
        if mask is not None:
            big = big.masked_fill(~mask, -2000.0)  # masked keys can never be the max
        xb = self.add_public(x, big)
        m = self.max_last(xb, bounded=True)
        d = xb - m.map(lambda t: t.expand(x.shape))  # <= 0
        # max(d, -16) = relu(d + 16) - 16: exp's table covers [-16, 0] (exp(-16) < 2^-20)
        d = self.add_public(self.relu(self.add_public(d, 16.0), bound=self.CMP_BOUND, slack=self.CMP_SLACK), -16.0)
        e = self.table(d, lut.TABLES["exp"])
        if mask is not None:
            e = self.mul_int(e, mask.to(torch.int64))
        s = e.sum(-1, keepdim=True)
        t = reciprocal_table(n)
        y = self.table(s, t)
        err, ev = t.width / t.lo, None
        while True:  # Newton y (2 - s y): the relative error squares
            also = [("matmul", e, values, self.f)] if values is not None and ev is None else []
            sy, *rest = self.run([("mul", s, y, self.f)] + also)
            ev = rest[0] if rest else ev
            (y,) = self.run([("mul", y, self.add_public(-sy, 2.0), self.f)])
            err = err * err
            if err < _RECIPROCAL_REL:
                break
        if values is None:
            return self.mul(e, y.map(lambda t_: t_.expand(x.shape)))
        return self.mul(ev, y.map(lambda t_: t_.expand(ev.shape)))

    def rsqrt(self, x: Shared, lo: float, hi: float, iters: int | None = None, times: Shared | Poly | None = None,
              extra: int = 0, per_octave: int = 16) -> Shared:
        """``1/sqrt(x)`` (``times * 1/sqrt(x)`` with ``times``, broadcast over the last dim) for x in
        [lo, hi] (in fact anywhere in [4^a, 4^b], the powers of four around [lo/2, 2 hi]) at scale
        2^(F + extra); the module docstring gives the steps. ``iters`` and ``per_octave`` (v3-mpc's
        Newton and thresholds) have no use here. Relative error < 1.9e-4 (the table's, lut.py);
        ``|times / sqrt(x)| < 2^10``. Rounds: 7 (the comparisons' AND rounds) + 1 (``x b_i``) +
        the lookup + 1 (``rsqrt(m) 2^-j``) + 2 with ``times`` (the product, its truncation; 1
        without: the truncation of 1/sqrt(x))."""
        f, G = self.f, _RSQRT_G
        # the powers of four around [lo/2, 2 hi]: a factor 2 of headroom either side (a row a little
        # beyond the public range stays accurate; beyond 4^b or below 4^a the index wraps)
        a, b = math.floor(math.log(lo / 2, 4)), math.ceil(math.log(2 * hi, 4))
        js = torch.arange(a, b, dtype=torch.float64)  # interval j: [4^j, 4^(j+1))
        Gc, Gs = 2 * max(b - 1, 0), max(b - 1, 0)  # fraction bits of 4^-j and 2^-j: both exact
        frac, out = f + extra + Gc, f + G - Gs  # m's scale; rsqrt(m)'s, so that rsqrt(m) 2^-j is at 2^(F+G)
        if frac > 60 or out < 16:
            raise ValueError(f"rsqrt: [{lo:g}, {hi:g}] is too wide for the ring at {f + extra} fraction bits")
        cs, ss = torch.pow(2.0, Gc - 2 * js).to(torch.int64), torch.pow(2.0, Gs - js).to(torch.int64)
        force = [("force", times)] if isinstance(times, Poly) else []  # times' truncation, in a round of ours
        # [x < 4^i] for the inner powers (at least one: b - a >= 2), lazy: their last step rides in the
        # round of x's products with them
        bits = self.ltz(_minus_each(x, self.encode(torch.pow(4.0, js[1:]), f + extra)), lazy=True)
        xe = x.map(lambda u: u.reshape(1, -1).expand(b - a - 1, -1).reshape(-1))  # threshold-major, as the bits
        xb, bs, *tf = self.run([("mul", xe, bits, None), ("force", bits)] + force)
        times = tf[0] if force else times
        m = _interval_const(xb, cs, x.shape, base=self.mul_int(x, int(cs[-1])))  # x 4^-j at 2^frac
        t = dataclasses.replace(lut.TABLES["rsqrt_mantissa"], frac=frac, out_frac=out)
        # rsqrt(m) (at 2^out) times the one-hot 2^-j (at 2^Gs): 1/sqrt(x) at 2^(F+G), no truncation
        (r,) = self.run([("mul", self.table(m, t), _interval_const(bs, ss, x.shape), None)])
        if times is None:
            return self.trunc(r, G)
        (z,) = self.run([("mul", times, r.map(lambda u: u.expand(times.shape)), f + G)])
        return z

    def silu_gate(self, x: Shared | LazySum, up: Shared | LazySum) -> Shared:
        x, up = self._value(x), self._value(up)
        # the bounded clip lets through up to CMP_SLACK more: the table's [-16, 16] then still holds
        lim = 16.0 - self.CMP_SLACK
        xc, (xu,) = self.clip(x, -lim, lim, bounded=True, also=[("mul", x, up, self.f)])
        return self.mul(self.table(xc, lut.TABLES["sigmoid"]), xu)

    def gelu_tanh(self, x: Shared) -> Shared:
        lim = 8.0 - self.CMP_SLACK
        xc = self.clip(x, -lim, lim, bounded=True)
        return self.mul(self.table(xc, lut.TABLES["gelu_gate"]), x)
