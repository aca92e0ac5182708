"""The other party's slot of a share held by one party: no data, no work.

A party engine (protocols/mpc/engine.py with a transport) holds only its own share of every value; the
arithmetic is written over pairs ``(c, s)`` so that the same code also runs as the two-party
simulator. In a party the other slot is :data:`VOID`: every tensor operation that touches it
returns it again at no cost, so the party does its own half of the work only (computing a
don't-care slot as zeros doubled every party's CPU). Anything that would *read* it (a shape,
a number, a truth value) raises, so a protocol bug that mixes the slots fails loudly instead of
computing with zeros.
"""

from __future__ import annotations

import torch

# tensor methods that only rearrange or combine values: on the void they give the void
_METHODS = frozenset({
    "view", "reshape", "transpose", "expand", "expand_as", "clone", "sum", "unsqueeze", "squeeze",
    "flatten", "contiguous", "to", "cpu", "permute", "narrow", "repeat", "masked_fill",
})


class Void:
    __slots__ = ()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return VOID

    def __getattr__(self, name):
        if name in _METHODS:
            return _void_method
        raise AttributeError(f"the other party's slot has no {name!r}: a party reads only its own share")

    def __getitem__(self, _):
        return self

    def __bool__(self):
        raise TypeError("the other party's slot has no value")

    def __repr__(self):
        return "VOID"

    def _same(self, *_):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = _same
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __lshift__ = __rlshift__ = _same
    __rshift__ = __rrshift__ = __neg__ = __invert__ = __floordiv__ = __rfloordiv__ = _same


VOID = Void()


def _void_method(*_args, **_kwargs):
    return VOID


def real(*slots) -> torch.Tensor:
    """The one real tensor among ``slots`` (a party's own)."""
    for t in slots:
        if t is not VOID:
            return t
    raise ValueError("both slots are void")
