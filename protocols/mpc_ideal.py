"""The v3-mpc simulator with ideal Beaver products: the same values, a fraction of the work.

:class:`IdealEngine` is the two-party simulator of :mod:`mpc` with each interactive primitive
replaced by its ideal functionality: a linear layer, a product, a matrix product (so also the
truncation's wrap-bit product) and a comparison are computed from the two shares directly, and
the result is re-shared with a fresh uniform server share (``ring.MaskPRG``). This is what the Beaver protocols compute, in
distribution, not only in value:

- a Beaver product returns ``x y mod 2^64`` exactly, with the server's share ``c_s + e b_s + a_s d``
  uniform and independent of everything else (``c_s`` is a fresh uniform share);
- the truncation is the engine's own (:meth:`mpc.Engine.trunc_many`): local shifts of the
  *actual* shares plus the wrap bit, whose one product is the ideal one here, so its one-unit
  error depends on the sharing exactly as in the protocol;
- ``ltz`` is exact in both.

So every approximation, encoding, range treatment and truncation error of the protocol is
reproduced, while triple generation, Beaver openings and the AND-gate adders (most of the
simulator's time) are skipped. Rounds and opened elements are counted as the real engine counts
them (tests check the counts match). What this cannot test is the Beaver and AND-gate machinery
itself: the real :class:`mpc.Engine` does, in the unit and networked tests. Used for accuracy
measurements on SmolLM2 over hundreds of positions (protocols/mpc_accuracy.py).
"""

from __future__ import annotations

import torch

from . import mpc

_LTZ_ROUNDS = 8           # 7 rounds of AND gates (Kogge-Stone over 64 bits) + 1 Beaver product (B2A)
_LTZ_OPENED_PER_ELEMENT = 26  # 12 AND gates x 2 words, + 2 for the B2A product


class IdealEngine(mpc.Engine):
    """Two-party simulator (``transport=None`` only) with ideal products, truncation and comparison."""

    def __init__(self, frac_bits: int = mpc.FRAC_BITS):
        super().__init__(frac_bits=frac_bits)

    def _fresh(self, v: torch.Tensor) -> mpc.Shared:
        """``v`` re-shared with a uniform server share, as every Beaver output is."""
        s = self.prg.ring(*v.shape)
        return mpc.Shared(v - s, s)

    def _count(self, rounds: int, opened: int) -> None:
        self.stats.rounds += rounds
        self.stats.opened_elements += opened

    def _products(self, op, pairs, truncate: bool) -> list[mpc.Shared]:
        if not pairs:
            return []
        self._count(1, sum(x.c.numel() + y.c.numel() for x, y in pairs))
        out = [self._fresh(op(x.c + x.s, y.c + y.s)) for x, y in pairs]  # wraps mod 2^64, exactly
        return self.trunc_many([(z, self.f) for z in out]) if truncate else out

    def ring_matmul(self, W, x: mpc.Shared) -> mpc.Shared:
        return self._fresh(W.matmul(x.c + x.s))  # W x_c + W x_s = W x mod 2^64

    def mul_many(self, pairs, truncate: bool = True) -> list[mpc.Shared]:
        return self._products(torch.mul, pairs, truncate)

    def matmul_many(self, pairs, truncate: bool = True) -> list[mpc.Shared]:
        return self._products(torch.matmul, pairs, truncate)

    def ltz(self, x: mpc.Shared) -> mpc.Shared:
        self._count(_LTZ_ROUNDS, _LTZ_OPENED_PER_ELEMENT * x.c.numel())
        return self._fresh(mpc._msb(x.c + x.s))
