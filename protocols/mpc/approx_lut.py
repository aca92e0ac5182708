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

What stays v3-mpc's, plainly: the norms' rsqrt (comparisons + Newton) -- its range (d 1e-3 to
d 1e6) needs an exponent/mantissa split that single uniform tables cannot give (lut.py).

The comparisons' carry (``_sum_bit``, under ltz, relu, clip and the max) is the millionaires'
protocol over 1-of-16 OT (millionaire.py), not v3-mpc's Kogge-Stone adder: fewer rounds and a
small fraction of the AND triples.
"""

from __future__ import annotations

import functools

import torch

from . import lut, millionaire
from .engine import Engine
from .shares import LazySum, Shared

# below 1e-4 relative after Newton: enough next to the tables' own errors
_RECIPROCAL_REL = 1e-4


@functools.lru_cache(maxsize=None)
def reciprocal_table(n: int) -> lut.Table:
    """1/s over [0.99, 1.01 n] (a softmax sum of n terms, the largest exp(0) = 1)."""
    return lut.Table("reciprocal", lambda x: 1 / x, 0.99, 1.01 * max(n, 2), 12)


class LutEngine(Engine):
    """The v3-mpc engine with v3-ot's table lookups for exp, reciprocal, sigmoid and GELU."""

    digit_bits = millionaire.DIGIT_BITS  # the comparisons' digits (millionaire.py)

    def __init__(self, provider, **kw):
        super().__init__(provider, **kw)
        self.lookups = 0  # elements looked up (each one 1-of-2^k OT)

    def _sum_bit(self, xc: torch.Tensor, xs: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        return millionaire.sum_bit(self, xc, xs, p, self.digit_bits)

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
