"""The share types of v3-mpc and small ring helpers.

A value is shared additively, ``x = x_c + x_s mod 2^64`` (:class:`Shared`: the client's share
``c``, the server's ``s``); in a party engine the other party's slot is ``VOID`` (void.py).
:class:`ServerBit` and :class:`ClientBit` mark a party's private bit (a truncation's wrap bit,
a comparison's), which a polynomial may open more cheaply (engine.py); :class:`Lazy` asks a
product for a lazy truncation and :class:`LazySum` is a linear layer's output whose truncation
its reader does.
"""

from __future__ import annotations

import dataclasses

import torch

from .void import VOID, real


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
