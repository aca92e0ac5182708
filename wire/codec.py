"""Message bodies: msgpack, with tensors carried out of band.

A payload is::

    u32 body_len | msgpack body | pad to 8 | tensor 0 bytes | pad to 8 | tensor 1 bytes | ...

Inside the body a tensor is a msgpack extension (``EXT_NUMPY`` or ``EXT_TORCH``) holding
``[dtype, shape, index]``; its raw little-endian bytes follow the body in index order. Keeping
the bytes out of the msgpack stream avoids msgpack's copy on encode and lets the decoder view
them in place (8-byte aligned) without per-element work. uint64 and int64 survive exactly.
"""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np

from .errors import ErrorCode, ProtocolError
from .frames import Limits

EXT_NUMPY = 1
EXT_TORCH = 2
_LEN = struct.Struct("<I")
_ALIGN = 8

# Wire dtype names; little-endian always.
_NUMPY_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64")
}


def _torch():
    import torch  # imported lazily: the wire layer must not pay for torch unless tensors are used

    return torch


def _pad(n: int) -> int:
    return (-n) % _ALIGN


_ZEROS = bytes(_ALIGN)


def encode_body(body: dict) -> list:
    """The payload parts for ``body`` (a list of bytes-like objects, not joined)."""
    buffers: list[memoryview] = []

    def default(obj):
        kind = EXT_NUMPY
        if isinstance(obj, np.ndarray):
            arr = obj
            name = arr.dtype.name
        elif type(obj).__module__ == "torch" and type(obj).__name__ == "Tensor":
            torch = _torch()
            kind = EXT_TORCH
            t = obj.detach().to("cpu").contiguous()
            if t.dtype == torch.bfloat16:
                name, arr = "bfloat16", t.view(torch.int16).numpy().view(np.uint16)
            else:
                arr = t.numpy()
                name = arr.dtype.name
        else:
            raise TypeError(f"cannot encode {type(obj).__name__} on the wire")
        if name not in _NUMPY_DTYPES and name != "bfloat16":
            raise TypeError(f"dtype {name} is not supported on the wire")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))
        meta = msgpack.packb([name, list(arr.shape), len(buffers) - 1])
        return msgpack.ExtType(kind, meta)

    packed = msgpack.packb(body, default=default, use_bin_type=True)
    parts: list = [_LEN.pack(len(packed)), packed]
    pos = _LEN.size + len(packed)
    for buf in buffers:
        if _pad(pos):
            parts.append(_ZEROS[: _pad(pos)])
            pos += _pad(pos)
        parts.append(buf)
        pos += buf.nbytes
    return parts


def decode_body(payload: bytearray | bytes, limits: Limits = Limits()) -> dict:
    """Inverse of :func:`encode_body`; raises ProtocolError on anything malformed."""
    view = memoryview(payload)
    if len(view) < _LEN.size:
        raise ProtocolError(ErrorCode.MALFORMED, "payload shorter than its length prefix")
    (body_len,) = _LEN.unpack_from(view)
    start = _LEN.size + body_len
    if start > len(view):
        raise ProtocolError(ErrorCode.MALFORMED, "msgpack body runs past the payload")
    pos = start
    count = 0

    def ext_hook(code, data):
        nonlocal pos, count
        if code not in (EXT_NUMPY, EXT_TORCH):
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown extension type {code}")
        try:
            name, shape, index = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad tensor header: {exc}") from None
        # exactly what encode_body writes: not a string of digits, a map's keys, floats or bools
        if not (isinstance(shape, list) and all(type(s) is int for s in shape) and type(index) is int):
            raise ProtocolError(ErrorCode.MALFORMED, f"bad tensor header: shape {repr(shape):.60}, index {repr(index):.20}")
        shape = tuple(shape)
        if index != count:
            raise ProtocolError(ErrorCode.MALFORMED, "tensor buffers out of order")
        count += 1
        if count > limits.max_tensors_per_message:
            raise ProtocolError(ErrorCode.TENSOR_TOO_LARGE, "too many tensors in one message")
        if name == "bfloat16" and code == EXT_TORCH:
            dtype = np.dtype("<u2")
        elif name in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[name]
        else:
            raise ProtocolError(ErrorCode.MALFORMED, f"unsupported dtype {name!r}")
        if any(s < 0 for s in shape):
            raise ProtocolError(ErrorCode.MALFORMED, f"negative dimension in shape {shape}")
        elements = math.prod(shape)
        if elements > limits.max_tensor_elements:
            raise ProtocolError(
                ErrorCode.TENSOR_TOO_LARGE,
                f"tensor of {elements} elements exceeds the limit of {limits.max_tensor_elements}",
            )
        pos += _pad(pos)
        nbytes = elements * dtype.itemsize
        if pos + nbytes > len(view):
            raise ProtocolError(ErrorCode.MALFORMED, "tensor bytes run past the payload")
        arr = np.frombuffer(view, dtype=dtype, count=elements, offset=pos).reshape(shape)
        pos += nbytes
        if code == EXT_NUMPY:
            return arr
        torch = _torch()
        if name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(arr.copy())

    try:
        body = msgpack.unpackb(view[_LEN.size:start], ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(ErrorCode.MALFORMED, f"undecodable msgpack body: {exc}") from None
    if pos != len(view):
        raise ProtocolError(ErrorCode.MALFORMED, f"{len(view) - pos} trailing bytes after the tensors")
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "message body is not a map")
    return body
