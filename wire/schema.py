"""Message bodies checked once, at the edge: one schema per message type.

A handler declares what a message carries (field names, types, tensor dtypes and shapes,
bounds) and calls :meth:`Schema.check` first thing; a body that does not match is a
:class:`ProtocolError` with a clear code and message, and the handler only ever reads checked
values. Bounds that depend on the session (a unit's width, the session's row limit) are named in
the schema and given to ``check`` as keyword arguments::

    MASKED_LINEAR = Schema("MASKED_LINEAR", unit=Str(), m=Tensor("int64", ("rows", "in_dim")))
    body = MASKED_LINEAR.check(msg.body, in_dim=W.in_dim, rows=(1, max_rows))

A dimension is an int (exact), None (any) or a name: bound to an int (exact) or a ``(lo, hi)``
pair (a range, ``hi`` None for no upper end; going past ``hi`` is ``SEQ_TOO_LONG`` when the
schema says the dimension counts rows of a sequence), or to a function of the fields checked
before it (``in_dim=lambda f: units[f["unit"]].in_dim``). A name missing from ``check``'s
arguments is a bug in the caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import ErrorCode, ProtocolError

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Int:
    lo: int | str | None = None
    hi: int | str | None = None
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        lo, hi = (dims(b) if isinstance(b, str) else b for b in (self.lo, self.hi))
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _malformed(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
        return v


@dataclasses.dataclass(frozen=True)
class Float:
    lo: float | None = None
    hi: float | None = None
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        # an int is a number too (msgpack sends 0.0 as a float, but a peer may send 0); nan fails both bounds
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        if not ok or (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise _malformed(f"{what} must be a number in [{self.lo}, {self.hi}], got {v!r}")
        return float(v)


@dataclasses.dataclass(frozen=True)
class Str:
    choices: tuple[str, ...] | str | None = None  # a tuple, or the name of a collection given to check
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        choices = dims(self.choices) if isinstance(self.choices, str) else self.choices
        if not isinstance(v, str) or (choices is not None and v not in choices):
            raise _malformed(f"{what} must be " + (f"one of {sorted(choices)}" if choices is not None else "a string")
                             + f", got {v!r}")
        return v


@dataclasses.dataclass(frozen=True)
class Bytes:
    size: int | None = None
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        if not isinstance(v, bytes) or (self.size is not None and len(v) != self.size):
            raise _malformed(f"{what} must be {self.size if self.size is not None else 'some'} bytes")
        return v


@dataclasses.dataclass(frozen=True)
class Bool:
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        if not isinstance(v, bool):
            raise _malformed(f"{what} must be true or false, got {v!r}")
        return v


@dataclasses.dataclass(frozen=True)
class IntList:
    length: int
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        if (not isinstance(v, (list, tuple)) or len(v) != self.length
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise _malformed(f"{what} must be a list of {self.length} integers")
        return [int(x) for x in v]


@dataclasses.dataclass(frozen=True)
class Map:
    """A nested map with its own schema."""

    schema: "Schema"
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        return self.schema.check(v)


@dataclasses.dataclass(frozen=True)
class Dict:
    """A map whose keys and values each pass a field check (e.g. rows per unit: ``Dict(Str(choices=
    "units"), Int(1))``), with between ``lo`` and ``hi`` entries."""

    key: Any
    value: Any
    lo: int = 0
    hi: int | str | None = None
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        hi = dims(self.hi) if isinstance(self.hi, str) else self.hi
        if not isinstance(v, dict) or len(v) < self.lo or (hi is not None and len(v) > hi):
            raise _malformed(f"{what} must be a map of {self.lo} to {hi if hi is not None else 'any number of'} "
                             f"entries, got {type(v).__name__ if not isinstance(v, dict) else f'{len(v)} entries'}")
        return {self.key.check(f"{what} key", k, dims): self.value.check(f"{what}[{k!r}]", x, dims)
                for k, x in v.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A numpy array of ``dtype`` with ``shape`` (see the module docstring; the name of a whole
    shape given to ``check`` also works); ``rows`` is the index of the dimension that counts
    sequence positions, whose excess is SEQ_TOO_LONG."""

    dtype: str
    shape: tuple | str | None = None
    rows: int | None = None
    default: Any = _MISSING

    def check(self, what: str, v, dims):
        kind = "ring elements (int64)" if self.dtype == "int64" else self.dtype
        if not isinstance(v, np.ndarray) or v.dtype != np.dtype(self.dtype):
            raise _malformed(f"{what} must carry {kind}, not {getattr(v, 'dtype', type(v).__name__)}")
        shape = dims(self.shape) if isinstance(self.shape, str) else self.shape  # a whole shape by name
        if shape is None:
            return v
        if v.ndim != len(shape):
            raise _malformed(f"{what} must have {len(shape)} dimensions, got shape {v.shape}")
        for i, (n, want) in enumerate(zip(v.shape, shape)):
            want = dims(want) if isinstance(want, str) else want
            if want is None:
                continue
            lo, hi = want if isinstance(want, tuple) else (want, want)
            hi = float("inf") if hi is None else hi
            if n < lo or (i != self.rows and n > hi):
                raise _malformed(f"{what} must have shape {self._describe(dims)}, got {v.shape}")
            if n > hi:
                raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"{what}: {n} rows exceed the session's limit of {hi}")
        return v

    def _describe(self, dims) -> tuple:
        def one(d):
            d = dims(d) if isinstance(d, str) else d
            return "n" if d is None else (f"{d[0]}..{d[1] or ''}" if isinstance(d, tuple) else d)
        return tuple(one(d) for d in (dims(self.shape) if isinstance(self.shape, str) else self.shape))


class Schema:
    """The body of one message type: exactly these fields (those with a default may be
    absent), checked in order."""

    def __init__(self, name: str, **fields):
        self.name = name
        self.fields = fields

    def check(self, body, **dims) -> dict:
        if not isinstance(body, dict):
            raise _malformed(f"{self.name} body must be a map")
        if not all(isinstance(k, str) for k in body):  # msgpack maps may have keys of any type
            raise _malformed(f"{self.name} field names must be strings, got {sorted(map(repr, body))}")
        required = {n for n, f in self.fields.items() if f.default is _MISSING}
        if not required <= set(body) <= set(self.fields):
            raise _malformed(f"{self.name} takes {_names(required)}"
                             + (f" (optional: {_names(set(self.fields) - required)})" if set(self.fields) - required
                                else "") + f", got {sorted(body)}")
        done: dict = {}

        def dim(name: str):
            v = dims[name]
            return v(done) if callable(v) else v

        for n, f in self.fields.items():
            done[n] = f.check(f"{self.name} {n!r}", body[n], dim) if n in body else f.default
        return done


def _names(names) -> str:
    return ", ".join(repr(n) for n in sorted(names)) or "no fields"


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED, message)
