"""The ring Z_2^64: fixed-point encoding, CSPRNG masks, and the exact masked matrix product.

Values are int64 tensors whose bits *are* the ring element (two's complement = mod 2^64
arithmetic; torch int64 add/mul wrap). An activation ``x`` encodes as ``round(x * 2^f)`` with
``f`` picked per product (:class:`FixedPoint`). A weight row ``j`` encodes as ``round(W_j * s_j)`` with a public
per-row scale ``s_j = WMAX / max|W_j|`` (WMAX ~ 2^23), so each row keeps 23 significant bits whatever its
magnitude. (15-bit weights and fixed 16-bit activations were not enough: the demo prompt's
first token is a near-tie, 1.8e-4 apart in the float reference, and the rounding flipped it.) The product then decodes as
``y_j / (2^f * s_j)``.

Masks come from AES-256-CTR keyed by a 32-byte seed from ``os.urandom`` (:class:`MaskPRG`,
:func:`mask_rows`): uniform over the ring, reproducible from the seed so the preprocessing store
keeps seeds, not masks. torch / numpy default generators are never used for anything secret.

The exact product (:class:`RingMatrix`): the server multiplies a uniform ring tensor ``m`` by
the integer weights mod 2^64. There is no fast exact int64 GEMM on CPU (17-47x a float32
matmul, DESIGN.md s10), and float64 limb products stream 8 bytes per weight (measured here
2.3x a float32 decode step, memory-bound). So both operands are cut into int8 digits and one
int8 GEMM with int32 accumulation (``torch._int_mm``) does all partial products in a single
pass over 3 bytes per weight:

- ``m`` into 8 balanced base-256 digits (-128..127): ``m = sum_l m_l 2^(8l) mod 2^64`` (the
  bytes of ``m + 0x8080...80``, each minus 128: no carries to propagate);
- ``W`` into 3 balanced base-256 digits (-128..127): ``W = d_0 + 2^8 d_1 + 2^16 d_2``;
- ``P = [m_l rows] @ [d_0 | d_1 | d_2]`` exactly in int32 while ``128 * 128 * K < 2^31``;
- ``m W^T = sum_{l,p} P_{l,p} 2^(8(l + p)) mod 2^64`` with wrapping int64 arithmetic.

That is 24 multiply-adds per weight and row, so the int8 GEMM's speed decides a decode step.
``torch._int_mm`` here runs ~100 G multiply-adds/s; fbgemm's int8 GEMM (``quantized.
linear_dynamic``, AVX512-VNNI) runs 1.6-2.6x faster on these shapes, but only offers a float32
output of an input it quantizes itself. It is exact all the same when (a) the input holds the
values -128 and 127 (two pad columns with zero weights), so the per-tensor quantization is
scale 1, zero point 128, i.e. the digits themselves, and (b) every accumulator fits float32's
24-bit integers: 128 * 128 * K <= 2^24, hence K is cut into chunks of 1024 summed in int64. A
self-test at first use checks this exactness on the worst cases. Where it fails (an AVX2-only
CPU: fbgemm's u8*s8 pair sums saturate at int16) a CPU uses the float64 limbs below for every
product: ``torch._int_mm`` there is a plain loop (measured on such a CPU: 6.3 s for one SmolLM2
decode step's 121 products, against 0.2 s in float64). ``torch._int_mm`` remains the GPU path
(:func:`cpu_int8_kernel`).

Above ``INT8_MAX_ROWS`` rows (a prefill: compute-bound) the product instead splits ``m`` into
limbs of ``b`` bits (16 for SmolLM2's K, chosen so ``2^b * max|W| * K < 2^53``) and runs
float64 GEMMs: 4 float64 multiply-adds per weight and row, over float64 blocks converted from
the float32 copy of ``W`` (exact: |W| < 2^24) as they are used, so no float64 copy stays
resident. All paths give identical results; the tests check each against Python integers, and
a server checks its device's kernels at start (:func:`self_check`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Activations in fixed point with a scale chosen per product by the client.

    The client knows ``max|x|`` and each unit's largest integer row L1 norm, so it takes as many
    fractional bits ``f`` as keep ``round(max|x| * 2^f) * L1 < 2^62`` (capped at ``max_bits``):
    about 33 bits for normalised inputs, ~22 for SmolLM2's down projections that meet
    activations of ~3000. Every entry of the product then has ``|W x| < 2^62`` exactly, with the
    rounding of ``x`` counted: protocols/verify.py relies on that bound. The server never learns
    ``f`` (it multiplies uniform ring elements either way), and the mask material does not
    depend on it.
    """

    max_bits: int = 40
    min_bits: int = 8

    def bits_for(self, amax: float, l1_bound: int, log_bound: int = 62) -> int:
        """``f`` with ``round(amax 2^f) l1_bound < 2^log_bound`` (62 for a full reply; ``b - 2`` for a
        reply of ``b`` bits, protocols/lowbits.py)."""
        budget = log_bound - math.log2(max(amax, 2.0**-60) * max(l1_bound, 1))
        bits = min(self.max_bits, math.floor(budget))
        # the float estimate may be one bit too generous at the edge; settle it in integers: the
        # largest encoded magnitude (at most amax * 2^f rounded half up) times L1
        while bits >= self.min_bits and math.floor(amax * 2.0**bits + 0.5) * l1_bound >= 2**log_bound:
            bits -= 1
        if bits < self.min_bits:
            raise OverflowError(f"activations up to {amax:.3g} leave only {bits} fractional bits in the ring")
        return bits

    @staticmethod
    def encode(x: torch.Tensor, bits: int) -> torch.Tensor:
        """float activations -> ring (int64 bits), rounding to nearest."""
        return torch.round(x.to(torch.float64) * float(2**bits)).to(torch.int64)

    @staticmethod
    def decode(v: torch.Tensor, bits: int) -> torch.Tensor:
        """ring (int64 bits, read as signed) -> float64 at scale 2^bits."""
        return v.to(torch.float64) / float(2**bits)

    @staticmethod
    def decode_product(v: torch.Tensor, bits: int, row_scales: torch.Tensor) -> torch.Tensor:
        """ring products (n, out) -> float, reading the int64 bits as signed values."""
        return (v.to(torch.float64) / (float(2**bits) * row_scales.to(torch.float64))).to(torch.float32)


N_DIGITS = 3
WMAX = 127 * (1 + 2**8 + 2**16)  # 8355839: every |W| <= WMAX has balanced base-256 digits in -128..127


WEIGHT_SCALE_MAX = WMAX  # what each row's largest weight encodes to (23 bits)


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Public per-row scales ``WMAX / max|W_j|`` (1 for an all-zero row), float64."""
    peak = w.to(torch.float64).abs().amax(dim=1)
    return torch.where(peak > 0, WEIGHT_SCALE_MAX / peak.clamp_min(1e-300), torch.ones_like(peak))


def encode_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (out, in) -> (int64 weights with |W| <= WMAX, float64 per-row scales)."""
    scales = row_scales(w)
    return torch.round(w.to(torch.float64) * scales[:, None]).to(torch.int64).clamp_(-WMAX, WMAX), scales


_ZEROS = memoryview(bytes(1 << 19))  # the plaintext of MaskPRG's keystream chunks


class MaskPRG:
    """A seed-expanded stream of uniform ring elements (AES-256-CTR keystream)."""

    SEED_BYTES = 32

    def __init__(self, seed: bytes | None = None):
        self.seed = os.urandom(self.SEED_BYTES) if seed is None else bytes(seed)
        if len(self.seed) != self.SEED_BYTES:
            raise ValueError(f"mask seed must be {self.SEED_BYTES} bytes")
        self._enc = Cipher(algorithms.AES(self.seed), modes.CTR(bytes(16))).encryptor()

    def ring(self, *shape: int) -> torch.Tensor:
        # the keystream is written straight into the result, a cache-sized chunk at a time: 10x
        # faster for pools of millions than update() on one big zero buffer plus a copy
        # (update_into wants 15 spare bytes after each chunk: CTR writes exactly len(input))
        n = 8 * math.prod(shape)
        out = np.empty(n + 15, dtype=np.uint8)
        view = memoryview(out)
        for at in range(0, n, len(_ZEROS)):
            m = min(len(_ZEROS), n - at)
            self._enc.update_into(_ZEROS[:m], view[at:at + m + 15])
        return torch.from_numpy(out[:n].view(np.int64)).reshape(shape)


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


INT8_MAX_ROWS = 4  # measured crossover (bench_ring, SmolLM2 shapes): int8 (fbgemm) wins up to ~4 rows, float64 above
_LANE_SHIFTS = {w: torch.arange(64 // w, dtype=torch.int64) * w for w in (1, 16, 32)}


class _PadStream:
    """Random words for the padding lanes from one keystream (a fresh key per process), drawn
    in blocks: a cipher call per message's few pad words cost more than the packing."""

    BLOCK = 1 << 14

    def __init__(self):
        self.prg, self.buf, self.at = MaskPRG(), torch.empty(0, dtype=torch.int64), 0

    def ring(self, n: int) -> torch.Tensor:
        if self.at + n > self.buf.numel():
            self.buf, self.at = self.prg.ring(max(n, self.BLOCK)), 0
        self.at += n
        return self.buf[self.at - n:self.at]


@functools.lru_cache(maxsize=1)
def _pad_prg() -> _PadStream:
    return _PadStream()


def lane_bits(bits: int) -> int:
    """The lane a value of ``bits`` meaningful low bits travels in: 1, 16, 32 or 64 bits."""
    return 1 if bits <= 1 else 16 if bits <= 16 else 32 if bits <= 32 else 64


def pack_low(v: torch.Tensor, bits: int) -> torch.Tensor:
    """A flat int64 tensor's low ``lane_bits(bits)`` bits, ``64 / lane`` values per int64 (value
    ``j * per + i`` in lane i of word j, at bits ``lane * i``): what an opening of words whose
    upper bits nobody reads sends (the comparisons' AND rounds). The last word's unused lanes are
    random (CSPRNG), so a message of uniform values stays uniform."""
    w = lane_bits(bits)
    if w == 64:
        return v
    per = 64 // w
    pad = (-v.numel()) % per
    lanes = (torch.cat([v, _pad_prg().ring(pad)]) if pad else v).bitwise_and((1 << w) - 1).view(-1, per)
    return (torch.bitwise_left_shift(lanes, _LANE_SHIFTS[w])).sum(1)  # disjoint bits: the sum is their OR


def unpack_low(p: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The ``n`` values :func:`pack_low` packed (their low ``lane_bits(bits)`` bits; the rest 0)."""
    w = lane_bits(bits)
    if w == 64:
        return p
    return (torch.bitwise_right_shift(p.view(-1, 1), _LANE_SHIFTS[w]) & ((1 << w) - 1)).reshape(-1)[:n]


FBGEMM_K = 1024  # 128 * 128 * 1024 = 2^24: every accumulator of a chunk converts to float32 exactly


def _pack_int8(w: torch.Tensor):
    """fbgemm's packed form of int8 weights (out, k) with two zero pad columns, scale 1."""
    w = torch.cat([w, torch.zeros(w.shape[0], 2, dtype=torch.int8)], dim=1)
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; pinned torch has them
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack(torch._make_per_tensor_quantized_tensor(w, 1.0, 0), None)


_PADS = torch.tensor([-128.0, 127.0])


def _fbgemm_partial(x: torch.Tensor, packed) -> torch.Tensor:
    """Exact ``x @ w^T`` (int64) for int8 ``x`` (rows, k <= 1024) and packed int8 ``w``."""
    xf = torch.empty(x.shape[0], x.shape[1] + 2, dtype=torch.float32)
    xf[:, :-2] = x
    xf[:, -2:] = _PADS  # pins the dynamic quantization to scale 1, zero point 128
    return torch.ops.quantized.linear_dynamic(xf, packed, False).to(torch.int64)


@functools.cache
def fbgemm_exact() -> bool:
    """Whether fbgemm's int8 GEMM reproduces exact integer products here, worst cases included."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-128, 128, (64, FBGEMM_K), generator=g, dtype=torch.int8)
        x = torch.randint(-128, 128, (8, FBGEMM_K), generator=g, dtype=torch.int8)
        w[0], w[1], x[0], x[1] = -128, 127, -128, 127  # accumulators of +-2^24 and saturating pairs
        return torch.equal(_fbgemm_partial(x, _pack_int8(w)), x.to(torch.int64) @ w.to(torch.int64).t())
    except (RuntimeError, AttributeError):
        return False


KERNEL_ENV = "SHARDLM_INT8_KERNEL"  # fbgemm | int_mm | float64: overrides cpu_int8_kernel's choice


@functools.cache
def cpu_int8_kernel() -> str:
    """The CPU's kernel for decode-sized products (up to INT8_MAX_ROWS rows): ``fbgemm``,
    ``int_mm`` (both exact int8 GEMMs over the digit planes) or ``float64`` (the limbs).

    fbgemm where it is exact: it needs its packed copy of the planes (measured 3.4-4.5 bytes per
    weight resident for SmolLM2's shapes) but pays for it: a SmolLM2-shaped decode sweep took
    1.4-1.7x as long with torch._int_mm (which multiplies the plain planes, 3 bytes per weight;
    protocols/bench_memory.py --kernels). Elsewhere the float64 limbs: on an
    AVX2-only CPU fbgemm's u8*s8 pair sums saturate, and torch._int_mm is a plain loop 25-50x
    slower than the limbs. ``SHARDLM_INT8_KERNEL`` overrides the choice (``int_mm`` trades that
    decode speed for ~1 byte per weight less)."""
    forced = os.environ.get(KERNEL_ENV)
    if forced:
        if forced not in ("fbgemm", "int_mm", "float64"):
            raise ValueError(f"{KERNEL_ENV}={forced!r}: expected fbgemm, int_mm or float64")
        return forced
    return "fbgemm" if fbgemm_exact() else "float64"


N_LIMBS = 8  # balanced base-256 digits of the masked operand
# 2^(7l + 8p) for limb l and weight digit p, as wrapping int64 factors, shaped (l, 1, p, 1)
def _signed64(v: int) -> int:
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


# m + 0x8080...80: its bytes b_i give m's balanced digits b_i - 128 (sum (b_i - 128) 256^i = m).
# Reading an int64 tensor's bytes in that order needs a little-endian host.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("shardlm's ring product assumes a little-endian host")
_BALANCE = _signed64(0x8080808080808080)
_FACTORS = torch.tensor([[_signed64(1 << (8 * (l + p))) for p in range(N_DIGITS)]
                         for l in range(N_LIMBS)], dtype=torch.int64).view(N_LIMBS, 1, N_DIGITS, 1)


def f64_limb_bits(max_abs: int, k: int) -> int:
    """The widest limb for which every float64 partial product stays below 2^53."""
    for bits in (22, 16, 13, 11, 8):
        if 2**bits * max(max_abs, 1) * k < 2**53:
            return bits
    raise OverflowError(f"K={k} is too large for exact float64 products")


_F64_BLOCK_BYTES = 1 << 23  # float64 weight blocks made per product (measured: 2^21..2^26 alike, within noise)


_SCRATCH = threading.local()


def _scratch(n: int, device) -> torch.Tensor:
    """This thread's float64 block buffer (at least ``n`` values): a fresh 8 MB tensor per block
    costs its page faults every time (measured: the conversion then took ~3 ns per weight)."""
    buf = getattr(_SCRATCH, str(device), None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, _F64_BLOCK_BYTES // 8), dtype=torch.float64, device=device)
        setattr(_SCRATCH, str(device), buf)
    return buf


def _digit_planes(w: torch.Tensor) -> torch.Tensor:
    """Integer weights (out, in), |W| <= WMAX (any integer or exact float dtype) -> the (in, 3*out)
    int8 planes of their balanced base-256 digits, side by side (one GEMM pass over 3 bytes per weight)."""
    digits, rest = [], w.to(torch.int32)  # |W| < 2^23; bit operations, not division (~6x faster)
    for _ in range(N_DIGITS):
        d = torch.bitwise_and(rest + 128, 255) - 128
        digits.append(d.to(torch.int8))
        rest = torch.bitwise_right_shift(rest - d, 8)
    return torch.cat(digits, dim=0).t().contiguous()


class RingMatrix:
    """Integer weights (out, in), |W| <= WMAX, ready for exact products with ring tensors.

    What stays resident (measured in bench: ``python -m shardlm.protocols.bench_memory``):
    the weights once as float32 (``w32``: exact, |W| < 2^24; 4 bytes per weight), which the
    float64 path (prefills) converts a block at a time, and the int8 digit planes the decode
    path needs, once: fbgemm's packed copy on a CPU (~3 bytes), the plain planes on another
    device (3 bytes; ``torch._int_mm``). A persistent float64 copy (8 bytes per weight) is not
    kept: converting float32 blocks into a per-thread buffer measured 1.04-1.11x its prefill
    products' time (8-100 rows, SmolLM2 shapes); the plain planes are not kept beside fbgemm's
    copy (:attr:`digits` remakes them). ``kernel`` pins the int8 kernel (tests, the self-check).
    """

    def __init__(self, w_int: torch.Tensor, device: str | torch.device = "cpu",
                 row_scales: torch.Tensor | None = None, *, kernel: str | None = None):
        if w_int.dtype != torch.int64 or w_int.dim() != 2:
            raise TypeError("RingMatrix takes a 2-D int64 matrix")
        if w_int.numel() and int(w_int.abs().max()) > WMAX:
            raise OverflowError(f"integer weights must satisfy |W| <= {WMAX}")
        self._init(w_int.to(torch.float32), device, row_scales, kernel)

    @classmethod
    def from_digits(cls, digits: torch.Tensor, row_scales: torch.Tensor | None, max_abs: int, max_row_l1: int,
                    device="cpu") -> "RingMatrix":
        """A matrix from its stored digit planes (in, 3*out) and bounds (protocols/matrix_cache:
        the caller has checked them against the digits' hash)."""
        if digits.dtype != torch.int8 or digits.dim() != 2 or digits.shape[1] % N_DIGITS:
            raise TypeError("digit planes are a 2-D int8 (in, 3*out) matrix")
        if not 0 <= max_abs <= WMAX:
            raise OverflowError(f"integer weights must satisfy |W| <= {WMAX}")
        self = cls.__new__(cls)
        self._init(_from_planes(digits).to(torch.float32), device, row_scales, None)
        if (self.max_abs, self.max_row_l1) != (max_abs, max_row_l1):
            raise ValueError("the stored bounds do not match the digit planes")
        return self

    def _init(self, w32: torch.Tensor, device, row_scales, kernel: str | None) -> None:
        self.out_dim, self.in_dim = w32.shape
        if 128 * 128 * self.in_dim >= 2**31:  # int32 accumulation of the int8 path
            raise OverflowError(f"K={self.in_dim} is too large for exact int32 accumulation")
        # float sums of |W| < 2^23 are exact while below 2^53: these bounds are integers
        self.max_abs = int(w32.abs().max()) if w32.numel() else 0
        # the largest |row . x| per unit |x|: the client's bound against wrapping past 2^63
        self.max_row_l1 = int(w32.to(torch.float64).abs().sum(dim=1).max()) if w32.numel() else 0
        self.f64_limb_bits = f64_limb_bits(self.max_abs, self.in_dim)
        self.w32 = w32.to(device=device).contiguous()
        self.device = self.w32.device
        self.row_scales = row_scales
        # decode-sized products' kernel (``kernel``: a test's or the self-check's pick)
        self.int8 = kernel or ("int_mm" if self.device.type != "cpu" else cpu_int8_kernel())
        self._planes: torch.Tensor | None = None  # torch._int_mm's digit planes (not on an fbgemm CPU)
        self._packed: list | None = None  # fbgemm's packed digit planes per K chunk, made on first use
        b = self.f64_limb_bits
        shifts = list(range(0, 64, b))
        self._shifts64 = torch.tensor(shifts, device=self.device).view(-1, 1, 1)
        # the top limb's mask also drops the sign bits the arithmetic shift dragged in
        self._masks64 = torch.tensor([(1 << min(b, 64 - s)) - 1 for s in shifts], device=self.device).view(-1, 1, 1)
        self._factors = _FACTORS.to(self.device)

    @property
    def digits(self) -> torch.Tensor:
        """The (in, 3*out) int8 digit planes (the disk cache's format); made anew unless held."""
        return self._planes if self._planes is not None else _digit_planes(self.w32)

    def int_weights(self) -> torch.Tensor:
        """The integer weights (out, in) as int32 (the HE offline phase encodes them into
        plaintext polynomials: protocols/he)."""
        return self.w32.to(torch.int32).cpu()

    def nbytes(self) -> dict[str, int]:
        """Resident bytes per kind: ``float32`` (w32), ``planes`` (int8 digit planes held for
        torch._int_mm), ``packed`` (fbgemm's copy: its int8 weights as fbgemm unpacks them, pad
        columns included, and one int32 column offset per output row and K chunk; fbgemm's
        blocked layout adds ~10-50% more, measured by RSS in protocols/bench_memory) and
        ``row_scales`` (float64 per output row)."""
        # from the shapes (an unpack would copy them all per info request; tests/test_memory checks
        # this against linear_unpack): per K chunk, 3 * out rows of chunk + 2 int8 and an int32 offset
        packed = sum(N_DIGITS * self.out_dim * (min(FBGEMM_K, self.in_dim - lo) + 2 + 4)
                     for lo, _p in self._packed or ())
        return {"float32": self.w32.nbytes, "planes": self._planes.nbytes if self._planes is not None else 0,
                "packed": packed, "row_scales": self.row_scales.nbytes if self.row_scales is not None else 0}

    @classmethod
    def from_float(cls, w: torch.Tensor, device="cpu") -> "RingMatrix":
        w_int, scales = encode_weights(w)
        return cls(w_int, device, scales)

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        """(n, in) ring -> (n, out) ring: exactly ``m @ W^T mod 2^64``."""
        m = m.to(self.device)
        return self._matmul_int8(m) if self.kernel(m.shape[0]) != "float64" else self._matmul_f64(m)

    def kernel(self, rows: int) -> str:
        """The kernel a product of ``rows`` rows runs: ``fbgemm`` / ``int_mm`` (int8 digits, up to
        INT8_MAX_ROWS rows: cpu_int8_kernel's choice on a CPU, int_mm on a GPU) or ``float64``."""
        return "float64" if rows > INT8_MAX_ROWS else self.int8

    def prepare(self) -> None:
        """Make the int8 kernel's weights now (fbgemm's packed planes, or the plain planes for
        torch._int_mm), as a server does at start-up: otherwise the first decode step stalls for
        them (seconds for SmolLM2)."""
        if not self.pack() and self.int8 == "int_mm" and self._planes is None:
            self._planes = _digit_planes(self.w32)

    def _matmul_f64(self, m: torch.Tensor) -> torch.Tensor:
        n, nl = m.shape[0], self._shifts64.shape[0]
        limbs = torch.bitwise_and(torch.bitwise_right_shift(m.unsqueeze(0), self._shifts64), self._masks64)
        limbs = limbs.to(torch.float64).view(nl * n, self.in_dim)
        partial = torch.empty(nl * n, self.out_dim, dtype=torch.float64, device=self.device)
        step = max(16, _F64_BLOCK_BYTES // (8 * max(self.in_dim, 1)))  # output rows per float64 block
        scratch = _scratch(min(step, self.out_dim) * self.in_dim, self.device)
        for lo in range(0, self.out_dim, step):  # every partial sum < 2^53: exact in any order
            rows = min(step, self.out_dim - lo)
            block = scratch[:rows * self.in_dim].view(rows, self.in_dim).copy_(self.w32[lo:lo + rows])
            torch.matmul(limbs, block.t(), out=partial[:, lo:lo + rows])
        partial = torch.bitwise_left_shift(partial.view(nl, n, self.out_dim).to(torch.int64), self._shifts64)
        return partial.sum(dim=0)  # wraps mod 2^64

    def left_matmul(self, u: torch.Tensor) -> torch.Tensor:
        """(k, out) integers with ``|u| <= 128`` -> (k, in): exactly ``u @ W`` (protocols/verify's
        secret rows). Every partial sum stays below ``128 * WMAX * out < 2^53``, so float64 GEMMs
        are exact; ``W`` is converted to float64 a block of input columns at a time, never whole."""
        if (u.numel() and int(u.to(torch.int64).abs().max()) > 128) or 128 * WMAX * self.out_dim >= 2**53:
            raise OverflowError("left_matmul is exact for |u| <= 128 and 128 * WMAX * out < 2^53 only")
        uf = u.to("cpu", torch.float64)
        out = torch.empty(u.shape[0], self.in_dim, dtype=torch.float64)
        w = self.w32.cpu()
        step = max(16, _F64_BLOCK_BYTES // (8 * max(self.out_dim, 1)))
        for lo in range(0, self.in_dim, step):
            torch.matmul(uf, w[:, lo:lo + step].to(torch.float64), out=out[:, lo:lo + step])
        return out.to(torch.int64)

    def pack(self) -> bool:
        """Make fbgemm's packed weights now (seconds for a large model: a server does it in a
        worker thread); False where the fbgemm path is not used."""
        if self.int8 != "fbgemm":
            return False
        if self._packed is None:
            wt = _digit_planes(self.w32).t()  # transient: fbgemm keeps its own copy
            self._packed = [(lo, _pack_int8(wt[:, lo:lo + FBGEMM_K].contiguous()))
                            for lo in range(0, self.in_dim, FBGEMM_K)]
        return True

    def _matmul_int8(self, m: torch.Tensor) -> torch.Tensor:
        return self._int8_product(self._int8_operand(m), m.shape[0])

    def _int8_operand(self, m: torch.Tensor):
        """``m``'s balanced int8 digits as this matrix's int8 kernel takes them: the (8n, in) limbs
        for torch._int_mm, fbgemm's float32 input per K chunk (pads included) for fbgemm. A
        RowStack makes it once for all its parts."""
        n = m.shape[0]
        # balanced digits in one pass: bytes of m + 0x80..80, each XOR 0x80 read as int8 = byte - 128
        raw = torch.add(m, _BALANCE).view(torch.uint8).view(n, self.in_dim, N_LIMBS)
        limbs = torch.bitwise_xor(raw, 0x80).view(torch.int8).permute(2, 0, 1).reshape(N_LIMBS * n, self.in_dim)
        if self.int8 != "fbgemm":
            return limbs
        chunks = []
        for lo in range(0, self.in_dim, FBGEMM_K):
            x = limbs[:, lo:lo + FBGEMM_K]
            xf = torch.empty(x.shape[0], x.shape[1] + 2, dtype=torch.float32)
            xf[:, :-2] = x
            xf[:, -2:] = _PADS  # pins the dynamic quantization to scale 1, zero point 128
            chunks.append(xf)
        return chunks

    def _int8_product(self, operand, n: int) -> torch.Tensor:
        if self.int8 == "fbgemm" and self.pack():
            partial = None
            for xf, (_lo, packed) in zip(operand, self._packed):
                y = torch.ops.quantized.linear_dynamic(xf, packed, False).to(torch.int64)
                partial = y if partial is None else partial.add_(y)
        else:
            self.prepare()
            partial = torch._int_mm(operand, self.digits)  # the held planes (made for this call if int8 is another kernel: tests)
        partial = partial.view(N_LIMBS, n, N_DIGITS, self.out_dim).to(torch.int64)
        return (partial * self._factors).sum(dim=(0, 2))  # int64 products and sums wrap mod 2^64


class RowStack:
    """Ring matrices with one input stacked by output rows, ``[A; B; ...]``, without a copy: v3's
    fused q/k/v and gate/up units are v2's single-op matrices stacked, and a v3-2r composite's
    ``[first; cross]`` holds the very ``first`` matrix v2 and v3 use (units.matrix_for), so the
    protocols share one encoding of each weight. A product is one product per part, its outputs
    side by side (bit for bit the fused matrix's: each output row is the same integer dot product)."""

    def __init__(self, parts: list[RingMatrix]):
        if not parts or len({p.in_dim for p in parts}) != 1:
            raise ValueError("a row stack takes matrices with one input width")
        self.parts = list(parts)
        self.in_dim, self.out_dim = parts[0].in_dim, sum(p.out_dim for p in parts)
        self.device = parts[0].device
        self.max_abs = max(p.max_abs for p in parts)
        self.max_row_l1 = max(p.max_row_l1 for p in parts)

    @property
    def row_scales(self) -> torch.Tensor | None:
        """The parts' row scales stacked (made on use: the parts hold them)."""
        scales = [p.row_scales for p in self.parts]
        return None if any(s is None for s in scales) else torch.cat(scales)

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        first = self.parts[0]
        m = m.to(self.device)
        if first.kernel(m.shape[0]) == "float64" or any(p.int8 != first.int8 for p in self.parts):
            return torch.cat([p.matmul(m) for p in self.parts], dim=1)
        # the int8 operand once for all parts (a decode step's products are short: a separate
        # matmul per part measured 1.34x one fused matrix for SmolLM2's q/k/v and gate/up)
        operand = first._int8_operand(m)
        return torch.cat([p._int8_product(operand, m.shape[0]) for p in self.parts], dim=1)

    def kernel(self, rows: int) -> str:
        return self.parts[0].kernel(rows)

    def prepare(self) -> None:
        for p in self.parts:
            p.prepare()

    def pack(self) -> bool:
        return all([p.pack() for p in self.parts])

    def int_weights(self) -> torch.Tensor:
        return torch.cat([p.int_weights() for p in self.parts])

    @property
    def digits(self) -> torch.Tensor:
        """The stacked matrix's (in, 3*out) digit planes, made anew."""
        ds = [p.digits for p in self.parts]
        return torch.cat([d[:, k * p.out_dim:(k + 1) * p.out_dim] for k in range(N_DIGITS) for d, p in zip(ds, self.parts)],
                         dim=1)

    def left_matmul(self, u: torch.Tensor) -> torch.Tensor:
        """``u @ W`` exactly: the parts' products summed (int64: each is exact, their sum too)."""
        out, lo = None, 0
        for p in self.parts:
            y = p.left_matmul(u[:, lo:lo + p.out_dim])
            out, lo = (y if out is None else out + y), lo + p.out_dim
        return out


def _from_planes(digits: torch.Tensor) -> torch.Tensor:
    """(in, 3*out) digit planes -> the integer weights (out, in) as int32 (Horner over the planes)."""
    o = digits.shape[1] // N_DIGITS
    w = digits[:, (N_DIGITS - 1) * o:].to(torch.int32)
    for p in range(N_DIGITS - 2, -1, -1):
        w = w * 256 + digits[:, p * o:(p + 1) * o].to(torch.int32)
    return w.t().contiguous()


class KernelCheckError(RuntimeError):
    """The device's ring products are not exact (:func:`self_check`): a server must not start."""


def self_check(device: str | torch.device = "cpu") -> dict:
    """Check the exact product on ``device`` as a server will run it, against Python integers.

    Both of a matrix's kernels (the int8 one decode-sized products use, and the float64 limbs of
    prefills) and the dispatching :meth:`RingMatrix.matmul`, on worst-case operands: weight rows at
    +-WMAX (every digit +-127), rows whose digits are -128, random rows, and a {-1, 0, 1} matrix
    (which takes the widest float64 limbs); ring operands whose balanced digits are all +127,
    all -127 or all -128, all ones (-1), the int64 extremes and random words; K = 1101 crosses
    fbgemm's 1024-column chunks and lets int8 accumulators pass 2^24. The reference (:func:`exact_matmul_reference`) is Python
    big-integer arithmetic mod 2^64, sharing no code with the kernels. CUDA runs the very same
    code (``torch._int_mm`` and float64 GEMMs on the device). Returns a report (``exact``,
    ``kernels``, what failed); a server raises :class:`KernelCheckError` when not exact."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(20)
    k = FBGEMM_K + 77  # odd: a sum of k odd products past 2^24 is odd, so no float32 holds it
    w = torch.randint(-WMAX, WMAX + 1, (8, k), generator=g)
    w[0], w[1] = WMAX, -WMAX
    w[2] = -128 - 128 * 256  # digits -128, -128, 0: the balanced range's low end
    w[3] = torch.where(torch.arange(k) % 2 == 0, WMAX, -WMAX)
    small = torch.randint(-1, 2, (5, k), generator=g)
    # rows of words whose balanced digits are all +127, all -127 (their products with +-127 weight
    # digits are odd: a float32 accumulation of K of them loses bits), then -1 and the int64 extremes
    specials = [_signed64(0x7F7F7F7F7F7F7F7F), _signed64(0x0101010101010101 - 0x8080808080808080), -1, -(2**63),
                2**63 - 1, _signed64(-0x8080808080808080), 1]
    failures, checked, kernels = [], 0, set()
    for wi in (w, small):
        R = RingMatrix(wi, device)
        R.prepare()
        for rows in (INT8_MAX_ROWS, INT8_MAX_ROWS + 3):
            m = torch.randint(-2**63, 2**63 - 1, (rows, k), generator=g)
            for i, v in enumerate(specials[:rows]):
                m[i] = v
            want = exact_matmul_reference(m.numpy(), wi.numpy())
            kernel = R.kernel(rows)
            run = R._matmul_f64 if kernel == "float64" else R._matmul_int8
            for name, got in ((kernel, run(m.to(R.device))), ("matmul", R.matmul(m))):
                checked += 1
                kernels.add(kernel)
                if not np.array_equal(got.cpu().numpy(), want):
                    failures.append(f"{name} ({kernel}, {rows} rows, |W| <= {int(wi.abs().max())}): "
                                    f"{int((got.cpu().numpy() != want).sum())} of {want.size} entries differ")
    probe = RingMatrix(w[:1], device)
    return {"device": str(device), "exact": not failures, "products_checked": checked, "failures": failures,
            "kernels": {"decode": probe.kernel(1), "prefill": probe.kernel(INT8_MAX_ROWS + 1),
                        "int8_max_rows": INT8_MAX_ROWS},
            "seconds": round(time.perf_counter() - t0, 3)}


def compose_bits(k: int) -> int:
    """Bits for the right operand of :func:`exact_int_product` with 23-bit left entries."""
    return min(28, 61 - 23 - math.ceil(math.log2(max(k, 2))))


def exact_int_product(a: torch.Tensor, b: torch.Tensor, b_bits: int) -> torch.Tensor:
    """``a @ b`` exactly in int64 for |a| <= WMAX and |b| < 2^b_bits: ``b`` is cut into two
    halves so every float64 partial sum stays below 2^53 (exact in any summation order)."""
    half = (b_bits + 1) // 2
    if 23 + (b_bits - half + 1) + math.ceil(math.log2(max(a.shape[1], 2))) > 53:
        raise OverflowError(f"k={a.shape[1]} is too large for an exact float64 product")
    lo = torch.remainder(b + (1 << (half - 1)), 1 << half) - (1 << (half - 1))
    hi = torch.bitwise_right_shift(b - lo, half)
    af = a.to(torch.float64)
    return (torch.bitwise_left_shift(torch.matmul(af, hi.to(torch.float64)).to(torch.int64), half)
            + torch.matmul(af, lo.to(torch.float64)).to(torch.int64))


def compose(t_int: torch.Tensor, t_scales: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights and row scales of the float product ``t @ w1`` (out, k) @ (k, in), for
    precomposed units, from ``t``'s usual encoding ``(t_int, t_scales)`` (:func:`encode_weights`).

    Server and dealer must arrive at the very same integers, but a float GEMM's rounding depends
    on its summation order (thread count, BLAS build), and one flipped rounding would make the
    client's ``W r`` disagree with the server's ``W``. So the product is taken exactly over
    integers: ``t_int`` (23 bits per row) times ``w1`` encoded with one power-of-two scale for
    the whole matrix (28 bits for k <= 1024, so the integer product stays below 2^61), by
    :func:`exact_int_product`. Each row of the product is then rounded to 23 bits by an
    arithmetic shift; its row scale follows from the two encodings.
    """
    b_bits = compose_bits(t_int.shape[1])
    peak = float(w1.abs().max())
    e = math.floor(math.log2((2**b_bits - 1) / peak)) if peak > 0 else 0
    b = torch.round(w1.to(torch.float64) * 2.0**e).to(torch.int64)  # |b| < 2^b_bits, one scale 2^e
    p = exact_int_product(t_int, b, b_bits)

    def rounded_shift(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # round half up by 2^shift
        half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(shift), shift), 1)
        return torch.bitwise_right_shift(v + half, shift)

    top = p.abs().amax(dim=1)
    shift = torch.zeros_like(top)
    while (over := rounded_shift(top, shift) > WMAX).any():  # per row, the smallest shift that fits
        shift += over.to(torch.int64)
    return rounded_shift(p, shift[:, None]), t_scales * 2.0**e / torch.pow(2.0, shift.to(torch.float64))


def exact_matmul_reference(m: np.ndarray, w_int: np.ndarray) -> np.ndarray:
    """Python big-int ``m @ w^T mod 2^64`` for tests (slow, obviously correct)."""
    mu = [[int(v) % 2**64 for v in row] for row in m.tolist()]
    wu = w_int.tolist()
    out = [[sum(a * b for a, b in zip(row, wrow)) % 2**64 for wrow in wu] for row in mu]
    return np.array(out, dtype=np.uint64).view(np.int64)
