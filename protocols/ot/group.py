"""The prime-order group for base OTs: ristretto255 (RFC 9496), through libsodium as bundled by ``rbcl``.

Why ristretto255 and not the Ed25519 group that pynacl exposes: Chou–Orlandi's security
argument needs a group of prime order. Edwards25519 has cofactor 8, so a peer can send a point
with a small-order component; the receiver then multiplies it by its secret and the hash of the
result leaks the secret modulo 8 or lets the peer steer keys into a tiny set. Clearing the
cofactor (multiplying everything by 8) and rejecting small-order points fixes it, but every call
site must remember to. Ristretto255 is the prime-order quotient group of edwards25519 with a
canonical encoding: every 32-byte string either decodes to exactly one element of a group of
prime order L = 2^252 + 27742317777372353535851937790883648493 or is rejected, so there is no
cofactor to forget. The only element of small order left is the identity, which
:func:`decode_point` rejects explicitly (libsodium's validity check accepts it), as it rejects
encodings with bit 255 set (libsodium ignores that bit; RFC 9496 calls them non-canonical).

Cost (DESIGN.md s10): a base plus a variable-base multiplication take ~0.24 ms, so the 128
base OTs of one IKNP set-up cost tens of milliseconds. ``rbcl`` ships its own libsodium, so
the system library is not required; pynacl's libsodium does not export these functions.

Scalars are 32-byte little-endian integers below L drawn by libsodium's CSPRNG.
"""

from __future__ import annotations

import rbcl

from ...wire.errors import ErrorCode, ProtocolError

POINT_BYTES = 32
SCALAR_BYTES = 32
ORDER = 2**252 + 27742317777372353535851937790883648493
IDENTITY = bytes(32)
GENERATOR = rbcl.crypto_scalarmult_ristretto255_base((1).to_bytes(32, "little"))


class InvalidPoint(ProtocolError):
    """A received group element is malformed, not canonical, or the identity."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.MALFORMED, message)


def decode_point(data, what: str = "group element") -> bytes:
    """Validate a received ristretto255 encoding; return it as bytes or raise InvalidPoint."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidPoint(f"{what}: expected {POINT_BYTES} bytes, got {type(data).__name__}")
    if len(data) != POINT_BYTES:
        raise InvalidPoint(f"{what}: expected {POINT_BYTES} bytes, got {len(data)}")
    if data == IDENTITY:
        raise InvalidPoint(f"{what} is the identity element (small order): refusing it")
    if data[31] & 0x80:
        # s >= 2^255 > p is not canonical (RFC 9496 4.3.1); libsodium ignores this bit, so two
        # strings would name one element and the transcript hash could be steered: refuse it
        raise InvalidPoint(f"{what} is not canonical (bit 255 set)")
    if not rbcl.crypto_core_ristretto255_is_valid_point(data):
        raise InvalidPoint(f"{what} is not a canonical ristretto255 encoding of a group element")
    return data


def random_scalar() -> bytes:
    """A uniform non-zero scalar in [1, L) from libsodium's CSPRNG."""
    while True:
        s = rbcl.crypto_core_ristretto255_scalar_random()
        if s != bytes(32):
            return s


def scalar_from_int(k: int) -> bytes:
    return (k % ORDER).to_bytes(SCALAR_BYTES, "little")


def base_mul(s: bytes) -> bytes:
    """s·G for the standard generator G."""
    return rbcl.crypto_scalarmult_ristretto255_base(s)


def mul(s: bytes, p: bytes) -> bytes:
    """s·P. libsodium refuses (RuntimeError) if the product is the identity; P must be valid."""
    return rbcl.crypto_scalarmult_ristretto255(s, p)


def add(p: bytes, q: bytes) -> bytes:
    return rbcl.crypto_core_ristretto255_add(p, q)


def sub(p: bytes, q: bytes) -> bytes:
    return rbcl.crypto_core_ristretto255_sub(p, q)
