"""BFV through Microsoft SEAL (``seal-python``): the one parameter set, keys, and plaintexts as numpy.

Why SEAL: it is maintained, exposes BFV with a power-of-two plaintext modulus and plaintext
products in NTT form, and its ``seal-python`` 4.4 binding imports on this Python (3.11). The
``openfhe`` wheel ships only a cp310 binary; ``tenseal`` exposes batched (SIMD) encodings
only, and Cheetah's coefficient encoding needs raw coefficients. No HE primitive is written
here: this module only fixes parameters and moves coefficients in and out of SEAL objects.

Parameters (fixed: part of the protocol, compared byte for byte at set-up):
- N = 8192, coefficient modulus q: three 60-bit primes (SEAL's CoeffModulus.Create), two for
  data and SEAL's special prime: log q = 180 <= 218, the HomomorphicEncryption.org standard's
  bound for 128-bit security at N = 8192 (SEAL itself refuses non-compliant parameters:
  SEALContext's default sec_level is tc128).
- t = 2^59 (a power of two: products come out mod 2^59, which composes with the Z_2^64 ring
  through masks 2^5 r': protocols/he/service.py).
- Noise: a fresh secret-key encryption has ~53 bits of invariant noise budget; after one
  plaintext product with worst-case operands (every plaintext coefficient near t) and 64
  accumulations, ~21 bits are left (measured; tests/test_he.py asserts the worst case of the
  packings we use decrypts exactly and leaves a margin).
- Secret-key encryption: the client never sends a key of any kind. The server needs only the
  parameters to multiply; it holds no secret key, no public key, no Galois or relinearization key.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

N = 8192
LOG_T = 59  # SEAL's largest plaintext modulus is 60 bits, so 2^59 is the largest power of two
T = 1 << LOG_T
COEFF_BITS = (60, 60, 60)
_MAGIC = bytes.fromhex("5ea11004") + bytes(4)  # SEAL's serialization header: magic, version 4.x, no compression


class HEError(Exception):
    """A ciphertext or parameter set that does not belong to this protocol."""


def _seal():
    try:
        import seal
    except ImportError as exc:  # a declared dependency; say what is missing rather than a bare ImportError
        raise HEError("--offline he needs Microsoft SEAL's Python binding: pip install seal-python") from exc
    return seal


def _parms():
    seal = _seal()
    parms = seal.EncryptionParameters(seal.scheme_type.bfv)
    parms.set_poly_modulus_degree(N)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(N, list(COEFF_BITS)))
    parms.set_plain_modulus(T)
    return parms


@functools.lru_cache(maxsize=None)
def context():
    """The SEALContext of the fixed parameters (one per process; SEAL objects are thread-safe to read)."""
    ctx = _seal().SEALContext(_parms())
    if not ctx.parameters_set():
        raise HEError(f"SEAL refuses the parameters: {ctx.parameter_error_message()}")
    return ctx


def parameters() -> bytes:
    """The serialized parameter set: what the client announces and the server compares."""
    return _parms().to_bytes()


# SEAL's serialization of every ciphertext exchanged (size 2, top data level, uncompressed): a
# header, then c0 and c1, each one residue polynomial of N uint64 per data prime (the last prime
# of COEFF_BITS is SEAL's special prime, not part of the data). tests/test_he.py checks it.
CT_HEADER = 113
DATA_PRIMES = len(COEFF_BITS) - 1
CIPHERTEXT_BYTES = CT_HEADER + 2 * DATA_PRIMES * N * 8


def _header(body: bytes) -> bytes:
    return _MAGIC + struct.pack("<Q", 16 + len(body)) + body


def plaintext(coeffs: np.ndarray):
    """A SEAL Plaintext holding ``coeffs`` (uint64, each < t) as polynomial coefficients: SEAL's own
    serialized form built with numpy (the hex-string constructor costs ~2 ms per polynomial)."""
    seal = _seal()
    coeffs = np.ascontiguousarray(coeffs, dtype=np.uint64)
    n = coeffs.shape[0]
    data = _header(struct.pack("<Q", n) + coeffs.tobytes())
    p = seal.Plaintext()
    p.load_bytes(context(), _header(bytes(32) + struct.pack("<Qd", n, 1.0) + data))
    return p


def coefficients(p) -> np.ndarray:
    """A Plaintext's N coefficients (uint64), zero-padded (SEAL trims a plaintext's high zero terms)."""
    raw = p.to_bytes()
    n = struct.unpack_from("<Q", raw, 16 + 32)[0]
    out = np.zeros(N, np.uint64)
    out[:n] = np.frombuffer(raw, dtype=np.uint64, count=n, offset=16 + 32 + 16 + 16 + 8)
    return out


def load_ciphertext(raw: bytes):
    """A ciphertext received from the other party, checked: SEAL validates its header, its
    parameters and its coefficients against our context; we also require size 2 at the top data
    level, not in NTT form (what a fresh encryption or our products are)."""
    seal = _seal()
    ctx = context()
    ct = seal.Ciphertext()
    try:
        ct.load_bytes(ctx, raw)
    except (ValueError, RuntimeError) as exc:
        raise HEError(f"not a ciphertext of this protocol's parameters: {exc}") from None
    if ct.size() != 2 or ct.is_ntt_form() or list(ct.parms_id()) != list(ctx.first_parms_id()):
        raise HEError("ciphertext has the wrong size, level or form")
    return ct


class Keys:
    """The client's secret key, encryptor and decryptor. The key never leaves this object."""

    def __init__(self):
        seal = _seal()
        ctx = context()
        self.secret = seal.KeyGenerator(ctx).secret_key()
        self.encryptor = seal.Encryptor(ctx, self.secret)
        self.decryptor = seal.Decryptor(ctx, self.secret)

    def encrypt(self, coeffs: np.ndarray) -> bytes:
        return self.encryptor.encrypt_symmetric(plaintext(coeffs)).to_string()

    def decrypt(self, raw: bytes) -> np.ndarray:
        return coefficients(self.decryptor.decrypt(load_ciphertext(raw)))

    def noise_budget(self, raw: bytes) -> int:
        return self.decryptor.invariant_noise_budget(load_ciphertext(raw))
