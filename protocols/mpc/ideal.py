"""The v3-mpc simulator with ideal Beaver products: the same values, a fraction of the work.

:class:`IdealEngine` is the two-party simulator of :mod:`engine` with each interactive primitive
replaced by its ideal functionality: a linear layer, a product, a matrix product (so also the
truncation's wrap-bit product) and a comparison's adder are computed from the two shares
directly, and the result is re-shared with a fresh uniform server share (``ring.MaskPRG``).
This is what the Beaver protocols compute, in distribution, not only in value:

- a Beaver product returns ``x y mod 2^64`` exactly, with the server's share ``c_s + e b_s + a_s d``
  uniform and independent of everything else (``c_s`` is a fresh uniform share);
- the truncation is the engine's own (:meth:`Engine.trunc_many`): local shifts of the
  *actual* shares plus the wrap bit, whose one product is the ideal one here, so its one-unit
  error depends on the sharing exactly as in the protocol;
- ``ltz``'s adder gives bit ``p`` of the (shifted) shares' sum in both; the rest of ``ltz`` (the
  public bound's offset and dropped bits, the B2A product) is the engine's own.

So every approximation, encoding, range treatment and truncation error of the protocol is
reproduced, while triple generation, Beaver openings and the AND-gate adders (most of the
simulator's time) are skipped. Rounds and opened elements are counted as the real engine counts
them (tests check the counts match). What this cannot test is the Beaver and AND-gate machinery
itself: the real :class:`Engine` does, in the unit and networked tests. Used for accuracy
measurements on SmolLM2 over hundreds of positions (protocols/mpc/accuracy.py).
"""

from __future__ import annotations

import math

import torch

from . import poly
from .engine import FRAC_BITS, Engine
from .shares import Shared


class IdealEngine(Engine):
    """Two-party simulator (``transport=None`` only) with ideal products and comparison adders."""

    def __init__(self, frac_bits: int = FRAC_BITS):
        super().__init__(frac_bits=frac_bits)

    def _fresh(self, v: torch.Tensor) -> Shared:
        """``v`` re-shared with a uniform server share, as every Beaver output is."""
        s = self.prg.ring(*v.shape)
        return Shared(v - s, s)

    def ring_matmul(self, W, x: Shared) -> Shared:
        return self._fresh(W.matmul(x.c + x.s))  # W x_c + W x_s = W x mod 2^64

    def _products(self, items) -> list:
        op = {"mul": torch.mul, "matmul": torch.matmul}
        out, opened = [], 0
        for it in items:
            if it[0] == "poly":  # every polynomial's value, exactly (wraps mod 2^64)
                vars, terms, masked = poly.plan(it[1])[:3]
                opened += len(masked) * vars[0].numel()
                full = [v.c + v.s for v in vars]
                out.append([self._fresh(poly.value(t, full)) for t in terms])
            else:
                kind, x, y = it
                opened += x.numel() + y.numel()
                out.append(self._fresh(op[kind](x.c + x.s, y.c + y.s)))  # wraps mod 2^64, exactly
        if opened:
            self.stats.rounds += 1
            self.stats.opened_elements += opened
        return out

    def _sum_bit(self, xc: torch.Tensor, xs: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bit ``p`` of ``xc + xs`` computed directly, XOR-shared with a fresh random bit; the adder's
        rounds and opened words counted as :meth:`Engine._sum_bit` has them."""
        levels = math.ceil(math.log2(p)) if p > 1 else 0
        self.stats.rounds += 1 + levels
        self.stats.opened_elements += xc.numel() * (2 + 4 * max(0, levels - 1) + 2 * min(1, levels))
        bit = torch.bitwise_right_shift(xc + xs, p) & 1
        mine = self.prg.ring(*xc.shape) & 1
        return bit ^ mine, mine
