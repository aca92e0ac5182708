"""Low-bits replies for v2/v3/v3-2r: the server sends only the bits of ``W m`` the client needs.

The client recovers ``z = W x = W m + W r mod 2^64``. If a public per-unit bound keeps
``|z| < 2^(b-2)``, then ``z mod 2^b`` (sign-extended) is ``z`` itself, and it needs only
``W m mod 2^b`` from the server: ``z = (W m + W r) mod 2^b``. The low ``b`` bits of a uniform ring
element are uniform, so what the server sends stays uniform; ``b`` is fixed per unit from public
values alone (the weights' integer row L1 bound, :func:`reply_bits`), never from the activations,
so its choice says nothing about the prompt. The client pays in fractional bits: it encodes ``x``
so that ``round(max|x| 2^f) L1 < 2^(b-2)`` (ring.FixedPoint.bits_for), ``ACTIVATION_BITS - 2``
bits of magnitude-plus-fraction per activation instead of up to 40 fractional bits.

The window is ``(shift, bits)``: the server sends bits ``shift .. shift+bits-1`` of each product.
HE-made material (``mask_shift``, protocols/he/service.py) has masks ``2^s r'``, so the low ``s``
bits of ``m`` and ``W m`` are always zero; the window starts above them. The full reply is the
window ``(0, 64)``: the same bytes as the int64 products. The packing is tight: ``bits`` bits per
element, a row's ``out`` elements in ``ceil(out bits / 8)`` bytes: first each element's whole low
bytes, then the remaining ``bits mod 8`` bits of each, bit-packed.

The margin of two bits (``2^(b-2)``, as the full reply's ``2^62``) keeps protocols/verify's
analysis: an error that moves entries only by ``2^(b-1)`` flips bit ``b-1`` but not ``b-2``.
"""

from __future__ import annotations

import numpy as np
import torch

RING_BITS = 64
# Bits of ``|x| 2^f`` a unit's reply leaves the activations above the weights' L1 (plus the two-bit
# margin): f = ACTIVATION_BITS - log2 max|x| at least. Chosen by accuracy on SmolLM2 (README
# "Low-bits replies" has the measured fractional bits per unit and what they buy).
ACTIVATION_BITS = 26
MODES = ("low", "full")
_LANES = np.arange(8, dtype=np.uint64)


def reply_bits(l1_bounds: list[int], shift: int = 0, activation_bits: int = ACTIVATION_BITS) -> int:
    """A unit's public reply width: enough for its largest integer row L1 norm (over its parts)
    times ``2^activation_bits`` with the two-bit margin, within the ring above ``shift``."""
    return min(RING_BITS - shift, max(l1_bounds).bit_length() + activation_bits + 2)


def row_bytes(out_dim: int, bits: int) -> int:
    return -(-out_dim * bits // 8)


def pack(y: torch.Tensor, bits: int, shift: int = 0) -> np.ndarray:
    """(rows, out) int64 -> (rows, row_bytes) uint8: bits ``shift .. shift+bits-1`` of each entry."""
    rows, out = y.shape
    v = torch.bitwise_right_shift(y, shift) if shift else y  # arithmetic: the bits kept are below 64 - shift
    b8 = v.numpy().astype("<i8", copy=False).view(np.uint8).reshape(rows, out, 8)
    q, t = divmod(bits, 8)
    if t == 0:
        return np.ascontiguousarray(b8[:, :, :q]).reshape(rows, out * q)
    packed = np.empty((rows, row_bytes(out, bits)), np.uint8)
    packed[:, :out * q].reshape(rows, out, q)[:] = b8[:, :, :q]
    # the t-bit remainders of 8 products at a time fill t bytes: shift them into one word each
    groups = -(-out // 8)
    rest = np.zeros((rows, groups * 8), np.uint64)
    np.bitwise_and(b8[:, :, q], (1 << t) - 1, out=rest[:, :out], casting="unsafe")
    words = (rest.reshape(rows, groups, 8) << _LANES * np.uint64(t)).sum(axis=2, dtype=np.uint64)  # disjoint bits
    tail = words.astype("<u8", copy=False).view(np.uint8).reshape(rows, groups, 8)[:, :, :t].reshape(rows, -1)
    packed[:, out * q:] = tail[:, :packed.shape[1] - out * q]
    return packed


def unpack(buf: np.ndarray, out: int, bits: int) -> torch.Tensor:
    """(rows, row_bytes) uint8 -> (rows, out) int64 holding the ``bits`` low bits (higher bits zero)."""
    rows = buf.shape[0]
    q, t = divmod(bits, 8)
    if q == 8:
        return torch.from_numpy(buf.view("<i8").astype(np.int64, copy=False).reshape(rows, out))
    b8 = np.zeros((rows, out, 8), np.uint8)
    b8[:, :, :q] = buf[:, :out * q].reshape(rows, out, q)
    if t:
        groups = -(-out // 8)
        tail = np.zeros((rows, groups, 8), np.uint8)
        tail.reshape(rows, -1)[:, :buf.shape[1] - out * q] = buf[:, out * q:]  # t bytes a group, then padding
        tail[:, :, :t] = tail.reshape(rows, -1)[:, :groups * t].reshape(rows, groups, t).copy()
        tail[:, :, t:] = 0
        words = tail.view("<u8")  # (rows, groups, 1)
        b8[:, :, q] = ((words >> _LANES * np.uint64(t)) & np.uint64((1 << t) - 1)).reshape(rows, -1)[:, :out]
    return torch.from_numpy(b8.view("<i8").reshape(rows, out).astype(np.int64, copy=False))


def wrap(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v mod 2^bits`` read as a signed ``bits``-bit value (the identity at 64: int64 already wraps)."""
    if bits >= RING_BITS:
        return v
    return torch.bitwise_right_shift(torch.bitwise_left_shift(v, RING_BITS - bits), RING_BITS - bits)
