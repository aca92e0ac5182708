"""The ring Z_2^64: fixed-point encoding, CSPRNG masks, and the exact masked matrix product.

Values are int64 tensors whose bits *are* the ring element (two's complement = mod 2^64
arithmetic; torch int64 add/mul wrap). A real ``x`` with ``f`` fractional bits encodes as
``round(x * 2^f)``; a product of an activation (``f_a`` bits) and a weight (``f_w``) carries
``f_a + f_w`` bits and decodes by dividing by ``2^(f_a + f_w)``.

Masks come from AES-256-CTR keyed by a 32-byte seed from ``os.urandom`` (``MaskPRG``): uniform
over the ring, reproducible from the seed so the preprocessing store keeps seeds, not masks.
torch / numpy default generators are never used for anything secret.

The exact product (:class:`RingMatrix`): the server multiplies a uniform ring tensor ``m`` by
an integer weight matrix ``W`` mod 2^64. torch has no fast exact int64 GEMM on CPU (17-47x a
float32 matmul, DESIGN.md s10), so ``m`` is split into limbs of ``b`` bits, all limbs are
stacked into one float64 GEMM (one pass over the weights) and the partial products, exact as
long as ``2^b * max|W| * K < 2^53``, are recombined with wrapping int64 shifts. ``b`` is chosen
per matrix as the widest limb that keeps that bound (3 limbs of 22 bits for SmolLM2 with 16
fractional weight bits; 4 of 16 bits when weights are larger).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

FLOAT64_EXACT = 2**53


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    act_bits: int = 16
    weight_bits: int = 16

    @property
    def product_bits(self) -> int:
        return self.act_bits + self.weight_bits

    def encode(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """float -> ring (int64 bits), rounding to nearest."""
        scale = float(2 ** (self.act_bits if bits is None else bits))
        y = torch.round(x.to(torch.float64) * scale)
        if y.numel() and y.abs().max() >= 2**62:
            raise OverflowError(f"value {float(y.abs().max() / scale):.3g} too large for the fixed-point ring")
        return y.to(torch.int64)

    def encode_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.encode(w, self.weight_bits)

    def decode(self, v: torch.Tensor, bits: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """ring -> float, reading the int64 bits as a signed value."""
        scale = float(2 ** (self.product_bits if bits is None else bits))
        return (v.to(torch.float64) / scale).to(dtype)


class MaskPRG:
    """A seed-expanded stream of uniform ring elements (AES-256-CTR keystream)."""

    SEED_BYTES = 32

    def __init__(self, seed: bytes | None = None):
        self.seed = os.urandom(self.SEED_BYTES) if seed is None else bytes(seed)
        if len(self.seed) != self.SEED_BYTES:
            raise ValueError(f"mask seed must be {self.SEED_BYTES} bytes")
        self._enc = Cipher(algorithms.AES(self.seed), modes.CTR(bytes(16))).encryptor()

    def ring(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        raw = self._enc.update(bytes(8 * n))
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy()).reshape(shape)


def mask_rows(seed: bytes, start: int, n: int, k: int) -> torch.Tensor:
    """Rows ``start .. start+n`` of the (rows, k) mask matrix expanded from ``seed``.

    Row i occupies bytes [8*k*i, 8*k*(i+1)) of the AES-256-CTR keystream, so any slice is
    regenerated without expanding what precedes it.
    """
    offset = 8 * k * start
    block, skip = divmod(offset, 16)
    enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    raw = enc.update(bytes(skip + 8 * k * n))[skip:]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy()).reshape(n, k)


def random_ring(*shape: int) -> torch.Tensor:
    """Fresh uniform ring elements straight from a new random seed."""
    return MaskPRG().ring(*shape)


def limb_bits_for(max_abs_weight: int, k: int) -> int:
    """The widest limb (<= 22 bits) for which every partial product stays exact in float64."""
    for bits in (22, 21, 16, 13, 11, 8):
        if (2**bits) * max(1, max_abs_weight) * k < FLOAT64_EXACT:
            return bits
    raise OverflowError(f"weights up to {max_abs_weight} with K={k} cannot be multiplied exactly")


class RingMatrix:
    """An integer weight matrix (out, in) ready for exact products with ring tensors."""

    def __init__(self, w_int: torch.Tensor, device: str | torch.device = "cpu"):
        if w_int.dtype != torch.int64 or w_int.dim() != 2:
            raise TypeError("RingMatrix takes a 2-D int64 matrix")
        self.out_dim, self.in_dim = w_int.shape
        self.max_abs = int(w_int.abs().max()) if w_int.numel() else 0
        self.limb_bits = limb_bits_for(self.max_abs, self.in_dim)
        self.n_limbs = math.ceil(64 / self.limb_bits)
        # (in, out) float64: limbs (rows) @ W^T in one GEMM; contiguous for the BLAS.
        self.wt = w_int.to(device=device, dtype=torch.float64).t().contiguous()
        self.device = self.wt.device

    @classmethod
    def from_float(cls, w: torch.Tensor, fx: FixedPoint, device="cpu") -> "RingMatrix":
        return cls(fx.encode_weight(w), device)

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        """(n, in) ring -> (n, out) ring: exactly ``m @ W^T mod 2^64``."""
        m = m.to(self.device)
        n = m.shape[0]
        b, nl = self.limb_bits, self.n_limbs
        limbs = torch.empty((nl, n, self.in_dim), dtype=torch.float64, device=self.device)
        for i in range(nl):
            shift = b * i
            width = min(b, 64 - shift)
            # Arithmetic shift drags the sign in from the top; the mask keeps only this limb.
            limbs[i] = torch.bitwise_and(torch.bitwise_right_shift(m, shift), (1 << width) - 1)
        partial = torch.matmul(limbs.view(nl * n, self.in_dim), self.wt).view(nl, n, self.out_dim)
        partial = partial.to(torch.int64)
        out = partial[0].clone()
        for i in range(1, nl):
            out += torch.bitwise_left_shift(partial[i], b * i)  # wraps mod 2^64
        return out


def exact_matmul_reference(m: np.ndarray, w_int: np.ndarray) -> np.ndarray:
    """Python big-int ``m @ w^T mod 2^64`` for tests (slow, obviously correct)."""
    mu = [[int(v) % 2**64 for v in row] for row in m.tolist()]
    wu = w_int.tolist()
    out = [[sum(a * b for a, b in zip(row, wrow)) % 2**64 for wrow in wu] for row in mu]
    return np.array(out, dtype=np.uint64).view(np.int64)
