"""v3-ot's nonlinear steps on the v3-mpc engine: lookup tables (lut.py) where v3-mpc runs
polynomial and iterative approximations, products and comparisons as in v3-mpc with OT triples,
and bits applied to values by the OT multiplexer (mux.py) instead of Beaver products.

:class:`LutEngine` is :class:`engine.Engine` with these overrides (everything else, the linear
layers and the plan executor included, is v3-mpc's):

- ``relu`` (so ``clip`` too): the comparison's XOR-shared bit (compare.py's ``ge_bits``) times x
  by two 1-of-2 OTs per element (32 bytes each way) instead of a Beaver product by OT triples
  (~3 KB); ``also`` items get a round of their own.
- ``max_last``: a tournament ``max(a, b) = b + relu(a - b)`` (n - 1 comparisons and
  multiplexers): compare.py's all-pairs max multiplies winner bits by OT triples, ~200 MB per
  SmolLM2 layer at 20 keys.
- ``softmax``: the row max, ``x - max`` clipped below at exp's table start (-12) by one bounded
  relu, exp by its table (one round), the sum ``s`` in [1, n], ``1/s`` started by a reciprocal
  table over [0.99, 1.01 n] and refined by Newton ``y (2 - s y)`` (one step squares the table's
  relative error ``w``; steps until it is below 1e-4), ``e @ values`` riding in the first Newton
  product.
- ``silu_gate``: ``x`` clipped to sigmoid's table range [-8, 8] (less the comparisons' slack: the
  bounded clip may let 1/8 more through, still inside the table), ``x up`` riding in the clip's
  last round, sigmoid by its table, one product: ``sigmoid(x) (x up)``.
- ``gelu_tanh``: ``x`` clipped to [-7.875, 7.875], the gate ``gelu(x)/x`` by a table (0 and 1 within 1e-14 at
  the clip points, so the clip costs no accuracy), one product ``x gate``.

What stays v3-mpc's, plainly: the norms' rsqrt (comparisons + Newton) -- its range (d 1e-3 to
d 1e6) needs an exponent/mantissa split that single uniform tables cannot give (lut.py).

The comparisons' carry (``_sum_bit``, under ltz, relu, clip and the max) is the millionaires'
protocol over 1-of-16 OT (millionaire.py), not v3-mpc's Kogge-Stone adder: fewer rounds and a
small fraction of the AND triples.

:class:`IdealLutEngine` is the same engine with ideal functionalities (ideal.py), for accuracy
runs on SmolLM2 (accuracy.py, tests/test_v3_ot_smollm2.py).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import lut, millionaire, mux
from .engine import Engine
from .ideal import IdealEngine
from .shares import LazySum, Shared, cat

# below 1e-4 relative after Newton: enough next to the tables' own errors
_RECIPROCAL_REL = 1e-4


@functools.lru_cache(maxsize=None)
def reciprocal_table(n: int) -> lut.Table:
    """1/s over [0.99, 1.01 n] (a softmax sum of n terms, the largest exp(0) = 1)."""
    return lut.Table("reciprocal", lambda x: 1 / x, 0.99, 1.01 * max(n, 2), 12)


class LutEngine(Engine):
    """The v3-mpc engine with v3-ot's table lookups for exp, reciprocal, sigmoid and GELU."""

    digit_bits = millionaire.DIGIT_BITS  # the comparisons' digits (millionaire.py)

    def __init__(self, provider=None, **kw):
        super().__init__(provider, **kw)
        self.lookups = 0  # elements looked up (each one 1-of-2^k OT)
        self.lookup_bytes = 0  # their OT traffic, both ways (lut.Table.bytes_per_eval)

    def _sum_bit(self, xc: torch.Tensor, xs: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        return millionaire.sum_bit(self, xc, xs, p, self.digit_bits)

    def table(self, x: Shared, t: lut.Table) -> Shared:
        self.lookups += x.numel()
        self.lookup_bytes += x.numel() * sum(t.bytes_per_eval)
        return lut.on_shares(self, x, t)

    def mux(self, x: Shared, bc: torch.Tensor, bs: torch.Tensor) -> Shared:
        """``(bc XOR bs) x`` by two 1-of-2 OTs per element (mux.py), not a Beaver product."""
        return mux.on_shares(self, x, bc, bs)

    def relu(self, x: Shared, bound: float | None = None, slack: float | None = None,
             also: list[tuple] = ()) -> Shared | tuple[Shared, list[Shared]]:
        """compare.py's relu with the bit applied by the OT multiplexer; ``also`` in a round of its own."""
        z = self.mux(x, *self.ge_bits(x, bound, slack))
        return (z, self.run(list(also))) if also else z

    def max_last(self, x: Shared, bounded: bool = False) -> Shared:
        """Max over the last dim by a tournament ``max(a, b) = b + relu(a - b)``: n - 1 comparisons
        and multiplexers in ceil(log2 n) layers. (compare.py's bounded max compares all pairs of up
        to 32 keys and multiplies the winner's bits: fewer rounds, but its products by OT triples
        made it ~200 MB per SmolLM2 layer at 20 keys.) ``bounded``: differences within
        +-CMP_BOUND, compared exactly on fewer bits."""
        kw = dict(bound=self.CMP_BOUND) if bounded else {}
        while x.shape[-1] > 1:
            n = x.shape[-1]
            if n % 2:  # a copy of the last value never changes the max
                x = cat([x, x.map(lambda t: t[..., -1:])], -1)
                n += 1
            a, b = x.map(lambda t: t[..., 0:n:2]), x.map(lambda t: t[..., 1:n:2])
            x = b + self.relu(a - b, **kw)
        return x  # (..., 1), as compare.py's

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
        # max(d, lo) = relu(d - lo) + lo: exp's table covers [lo, 0]
        te = lut.TABLES["exp"]
        d = self.add_public(self.relu(self.add_public(d, -te.lo), bound=self.CMP_BOUND, slack=self.CMP_SLACK), te.lo)
        e = self.table(d, te)
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
        t = lut.TABLES["sigmoid"]
        lim = t.hi - self.CMP_SLACK
        xc, (xu,) = self.clip(x, -lim, lim, bounded=True, also=[("mul", x, up, self.f)])
        return self.mul(self.table(xc, t), xu)

    def gelu_tanh(self, x: Shared) -> Shared:
        lim = 8.0 - self.CMP_SLACK
        xc = self.clip(x, -lim, lim, bounded=True)
        return self.mul(self.table(xc, lut.TABLES["gelu_gate"]), x)


class IdealLutEngine(IdealEngine, LutEngine):
    """v3-ot's simulator with ideal functionalities (ideal.py's products and comparison adders, and
    ideal table lookups) for accuracy runs on SmolLM2 over hundreds of positions (accuracy.py).

    A lookup returns what the OT step delivers: the entry at the index the two *actual* shares
    select (``lut.lut_plain_index``, so the +-1 carry error depends on the sharing exactly as in
    the protocol), re-shared with a fresh uniform server share (the sender's ``s_out``). The
    1-of-N OT machinery itself is tested by tests/test_lut.py and the networked v3-ot tests."""

    def mux(self, x: Shared, bc: torch.Tensor, bs: torch.Tensor) -> Shared:
        self.stats.rounds += 2
        return self._fresh((bc ^ bs) * (x.c + x.s))

    def table(self, x: Shared, t: lut.Table) -> Shared:
        self.lookups += x.numel()
        self.lookup_bytes += x.numel() * sum(t.bytes_per_eval)
        self.stats.rounds += 1

        def u64(a):
            return a.contiguous().numpy().view(np.uint64).reshape(-1)

        i = lut.lut_plain_index(t, u64(x.s), u64(x.c))  # the server is the sender (no offset)
        v = torch.from_numpy(t.entries()[i].view(np.int64).reshape(x.shape).copy())
        return self._fresh(v)
