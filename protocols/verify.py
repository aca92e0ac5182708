"""``--verify`` for v2, v3 and v3-2r: the client checks every product the server returns.

The masked protocols keep the prompt from the server whatever it does (it only ever sees uniform
``m``), but they trust its reply ``y = W m mod 2^64``: a server that alters it would steer the
completion unnoticed. With ``--verify`` the client refuses a reply unless it passes two checks:

1. **Freivalds over Z_2^64.** Per session and unit the client draws a secret ``U`` (``K x out``,
   entries uniform in -128..127: CSPRNG bytes from ring.random_ring, AES-CTR keyed from
   ``os.urandom``) and computes ``U W`` (``K x in``) exactly from the unit's integer ring matrix
   (units.matrices_for; a v3-2r composite block by block: ``W = [[A, 0], [0, T]]``, ``A`` = first
   over cross). A reply passes if ``y U^T == m (U W)^T mod 2^64`` in every row: ``rows K (in +
   out)`` multiply-adds against the server's ``rows in out``.
2. **Bound.** The unmasked product ``z = y + W r = W x`` must be one the client's encoding can
   produce: the client picks its fractional bits so that ``round(max|x| 2^f) L1 < 2^62``
   (ring.FixedPoint.bits_for with the exact integer row L1 norm, units.encoding_for), so every
   honest entry has ``|z| < 2^62``: bits 63 and 62 of ``z`` are equal.

**Analysis.** Let ``e = y' - W m != 0`` be the server's change to one row of a reply and ``v``
the least 2-adic valuation among its entries, reached at ``e_j = 2^v c``, ``c`` odd. For one row
``u`` of ``U``, ``u . e = 0`` needs ``u_j 2^v c = -s mod 2^64`` with ``s`` independent of ``u_j``,
i.e. (``c`` is invertible) ``u_j`` in one fixed class mod ``2^(64-v)``. The 256 values of ``u_j``
are distinct mod ``2^8``, so at most one of them lies in that class when ``64 - v >= 8``, and a
``2^-(64-v)`` share of them otherwise: one row misses with probability ``<= 2^-min(8, 64-v)``,
all ``K`` rows with ``<= 2^-K min(8, 64-v)``. (A full 64-bit ``u_j`` would do no better where it
matters: for ``v = 62`` only ``u_j mod 4`` counts either way.) If ``v = 63`` every changed entry
moved by ``2^63``: bit 63 of ``z`` flips, bit 62 does not, and the bound check refuses it always.
If ``v <= 62`` Freivalds misses with probability at most ``2^-2K``. A low-bits reply of ``b`` bits
(protocols/lowbits.py) is the same argument in ``Z_2^b``: the client's encoding keeps honest
entries below ``2^(b-2)``, the check compares mod ``2^b``, and 64 reads ``b`` throughout. With ``K = 20`` a reply that
alters any product passes with probability at most ``2^-40``. ``U`` stays secret: it is fresh per
session, the server sees only ``m`` (independent of ``U``), and the first failed check ends the
session, so the server learns nothing about ``U`` before it is caught. The bound check alone
depends on ``x``; it decides an abort that Freivalds would not only with probability
``<= 2^-40``, so aborting tells the server nothing about the prompt beyond that. Byte entries
keep ``U`` 8x smaller than ring elements would and ``U W`` below ``2^53``: exact float64 GEMMs
(ring.RingMatrix.left_matmul).

With ``--offline he|dealer`` (not built yet) the client holds no ``W``: ``U W`` would come from
the offline phase, as ``W r`` does.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..wire.errors import ErrorCode, ProtocolError
from . import ring

K = 20  # secret rows per unit: 2^-2K = 2^-40 per reply for every error the bound does not catch
BOUND_BITS = 62  # honest unmasked entries satisfy |W x| < 2^62 (ring.FixedPoint.bits_for); 2^(b-2) in b bits
RING_BITS = 64


class VerificationError(ProtocolError):
    """A reply failed the client's check; the session is aborted. ``unit`` names the unit."""

    def __init__(self, unit: str, reason: str):
        super().__init__(ErrorCode.VERIFICATION_FAILED,
                         f"the server's reply for unit {unit} failed verification ({reason}); session aborted")
        self.unit = unit

    def __str__(self) -> str:  # the CLI prints the message; the code travels separately
        return self.message


@dataclasses.dataclass(frozen=True)
class Key:
    """One unit's secret: ``u`` (K, out) int8 and ``uw = u W`` (K, in) int64."""

    u: torch.Tensor
    uw: torch.Tensor


def secret_rows(k: int, n: int) -> torch.Tensor:
    """(k, n) int8, uniform in -128..127 from the CSPRNG."""
    return ring.random_ring(-(-k * n // 8)).view(torch.int8)[:k * n].view(k, n)


def setup(matrix, k: int = K) -> Key:
    """A fresh key for one unit's matrix (a ring.RingMatrix or units.ComposedMatrix)."""
    u = secret_rows(k, matrix.out_dim)
    return Key(u, matrix.left_matmul(u))


FEW_ROWS = 4  # measured crossover: up to here broadcast products beat torch's int64 GEMM


def _ring_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T mod 2^64`` (int64 products and sums wrap, which is the ring). torch's int64 GEMM is
    slow on a decode step's single row (0.36 ms for 20 x 1536, 8 ms for the 49152-row head);
    multiplying elementwise and summing takes 0.03 ms and 1 ms."""
    if a.shape[0] <= FEW_ROWS:
        return (a[:, None, :] * b[None]).sum(dim=-1)  # int8 b promotes to int64
    return a @ b.to(torch.int64).t()


def check(key: Key, m: torch.Tensor, y: torch.Tensor, z: torch.Tensor, bits: int = RING_BITS) -> str | None:
    """Why the reply ``y`` to ``m`` (with ``z = y + W r``, unmasked) is refused, or None if it passes.
    A low-bits reply (protocols/lowbits.py) of ``bits`` bits: ``y`` and ``z`` mod ``2^bits``, ``z``
    sign-extended from there; all of the above holds with ``bits`` for 64 (Freivalds mod
    ``2^bits``, the bound ``2^(bits-2)``)."""
    diff = _ring_products(y, key.u) - _ring_products(m, key.uw)
    if bits < RING_BITS:
        diff = torch.bitwise_and(diff, (1 << bits) - 1)
    bad = (diff != 0).any(dim=1)
    if bad.any():
        return f"row {int(bad.nonzero()[0])}: Freivalds check y U^T != m (U W)^T mod 2^{bits}"
    bound = bits - (RING_BITS - BOUND_BITS)
    out = (z >= 2**bound) | (z < -2**bound)
    if out.any():
        row, col = (int(i) for i in out.nonzero()[0])
        return f"row {row}, entry {col}: |W x| >= 2^{bound} after unmasking, beyond any honest product"
    return None


class Verifier:
    """A session's keys for every unit (made at once: ``U W`` does not depend on the prompt, so
    it is offline work) and the time spent; :meth:`check` raises :class:`VerificationError`."""

    def __init__(self, matrices: dict, k: int = K):
        t0 = time.perf_counter()
        self.k = k
        self.keys = {name: setup(W, k) for name, W in matrices.items()}
        self.setup_seconds = time.perf_counter() - t0
        self.check_seconds = 0.0
        self.replies = 0
        self.bound_bits = BOUND_BITS  # the tightest range bound checked (low-bits replies: width - 2)

    def check(self, unit: str, m: torch.Tensor, y: torch.Tensor, z: torch.Tensor, bits: int = RING_BITS) -> None:
        t0 = time.perf_counter()
        reason = check(self.keys[unit], m, y, z, bits)
        self.bound_bits = min(self.bound_bits, bits - (RING_BITS - BOUND_BITS))
        self.check_seconds += time.perf_counter() - t0
        self.replies += 1
        if reason is not None:
            raise VerificationError(unit, reason)

    def stats(self) -> dict:
        return {"k": self.k, "bound_bits": self.bound_bits,
                "replies": self.replies, "setup_ms": self.setup_seconds * 1e3, "check_ms": self.check_seconds * 1e3}
