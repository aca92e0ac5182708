"""Known-answer tests for the OT engine's primitives, with expected values computed here from
the primitives' definitions (pure-Python ristretto255 from RFC 9496, AES on single blocks)."""
import hashlib
import os

import nacl.bindings
import numpy as np
import pytest
import rbcl
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shardlm.protocols.ot import group, prims

# -- ristretto255 from its definition (RFC 9496, section 4), with Python integers ----------------
P = 2**255 - 19
D = (-121665 * pow(121666, P - 2, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
L = 2**252 + 27742317777372353535851937790883648493


def _neg(v):
    return (v % P) & 1


def _abs(v):
    v %= P
    return P - v if _neg(v) else v


def _sqrt_ratio_m1(u, v):
    r = (u * pow(v, 3, P)) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    check = v * r * r % P
    correct, flipped, flipped_i = check == u % P, check == -u % P, check == (-u * SQRT_M1) % P
    if flipped or flipped_i:
        r = r * SQRT_M1 % P
    return correct or flipped, _abs(r)


INVSQRT_A_MINUS_D = _sqrt_ratio_m1(1, (-1 - D) % P)[1]


def _inv(x):
    return pow(x, P - 2, P)


def _ed_add(p1, p2):
    (x1, y1), (x2, y2) = p1, p2
    k = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + y1 * x2) * _inv(1 + k) % P, (y1 * y2 + x1 * x2) * _inv(1 - k) % P)


def _ed_mul(k, pt):
    acc, add = (0, 1), pt
    while k:
        if k & 1:
            acc = _ed_add(acc, add)
        add = _ed_add(add, add)
        k >>= 1
    return acc


def _ed_base():
    y = 4 * _inv(5) % P
    x2 = (y * y - 1) * _inv(D * y * y + 1) % P
    x = pow(x2, (P + 3) // 8, P)
    if x * x % P != x2:
        x = x * SQRT_M1 % P
    return (P - x if x & 1 else x, y)  # the base point's x is even


def _ed_decode(enc: bytes):
    """An Ed25519 point encoding (y, sign of x) -> affine (x, y)."""
    n = int.from_bytes(enc, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    x2 = (y * y - 1) * _inv(D * y * y + 1) % P
    x = pow(x2, (P + 3) // 8, P)
    if x * x % P != x2:
        x = x * SQRT_M1 % P
    assert x * x % P == x2
    return (P - x if (x & 1) != sign else x, y)


def ristretto_encode(pt) -> bytes:
    x0, y0 = pt
    z0, t0 = 1, x0 * y0 % P
    u1 = (z0 + y0) * (z0 - y0) % P
    u2 = x0 * y0 % P
    _, invsqrt = _sqrt_ratio_m1(1, u1 * u2 * u2 % P)
    den1, den2 = invsqrt * u1 % P, invsqrt * u2 % P
    z_inv = den1 * den2 * t0 % P
    ix0, iy0 = x0 * SQRT_M1 % P, y0 * SQRT_M1 % P
    enchanted = den1 * INVSQRT_A_MINUS_D % P
    if _neg(t0 * z_inv):
        x, y, den_inv = iy0, ix0, enchanted
    else:
        x, y, den_inv = x0, y0, den2
    if _neg(x * z_inv):
        y = -y % P
    return _abs(den_inv * (z0 - y)).to_bytes(32, "little")


B = _ed_base()


def test_reference_ristretto_matches_rfc9496_generator_vectors():
    # RFC 9496 appendix A.1: encodings of B and 2B; the constant from section 4.1
    assert INVSQRT_A_MINUS_D == 54469307008909316920995813868745141605393597292927456921205312896311721017578
    assert ristretto_encode((0, 1)) == bytes(32)
    assert ristretto_encode(B).hex() == "e2f2ae0a6abc4e71a884a961c500515f58e30b6aa582dd8db6a65945e08d2d76"
    assert ristretto_encode(_ed_mul(2, B)).hex() == "6a493210f7499cd17fecb510ae0cea23a110e8d5b901f8acadd3095c73a3b919"


def test_group_operations_against_the_reference():
    assert group.GENERATOR == ristretto_encode(B)
    for k in [1, 2, 3, 7, 8, 255, L - 1, *[int.from_bytes(os.urandom(32), "little") % L for _ in range(4)]]:
        s = group.scalar_from_int(k)
        kb = group.base_mul(s)
        assert kb == ristretto_encode(_ed_mul(k, B)), k
        # variable-base multiplication and addition agree with the reference too
        assert group.mul(group.scalar_from_int(3), kb) == ristretto_encode(_ed_mul(3 * k % L, B))
        assert group.add(kb, group.GENERATOR) == ristretto_encode(_ed_mul((k + 1) % L, B))
        assert group.sub(kb, group.GENERATOR) == ristretto_encode(_ed_mul((k - 1) % L, B))


def test_group_cross_checked_with_pynacl_ed25519():
    # pynacl's Ed25519 k*B, decoded and ristretto-encoded here, equals rbcl's ristretto255 k*B
    for _ in range(4):
        k = int.from_bytes(os.urandom(32), "little") % L
        ed = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(k.to_bytes(32, "little"))
        assert ristretto_encode(_ed_decode(ed)) == group.base_mul(group.scalar_from_int(k))


def test_group_algebraic_identities():
    a, b = group.random_scalar(), group.random_scalar()
    A, Bp = group.base_mul(a), group.base_mul(b)
    assert group.mul(a, Bp) == group.mul(b, A)  # Diffie-Hellman
    ab = rbcl.crypto_core_ristretto255_scalar_mul(a, b)
    assert group.base_mul(ab) == group.mul(a, Bp)
    apb = rbcl.crypto_core_ristretto255_scalar_add(a, b)
    assert group.base_mul(apb) == group.add(A, Bp)
    assert group.sub(group.add(A, Bp), Bp) == A
    assert group.sub(A, A) == group.IDENTITY
    # the order is L: (L-1)·G = -G, so adding G gives the identity
    assert group.add(group.base_mul(group.scalar_from_int(L - 1)), group.GENERATOR) == group.IDENTITY


def test_decode_point_rejects_identity_and_malformed_encodings():
    good = group.base_mul(group.random_scalar())
    assert group.decode_point(good) == good
    bad = {
        "identity": bytes(32),
        "short": good[:31],
        "long": good + b"\0",
        "non-canonical (s = p)": P.to_bytes(32, "little"),
        "non-canonical (s = p + 2)": (P + 2).to_bytes(32, "little"),
        "negative field element (odd s)": (1).to_bytes(32, "little"),
        "high bit set": (int.from_bytes(good, "little") | 1 << 255).to_bytes(32, "little"),
    }
    for name, data in bad.items():
        with pytest.raises(group.InvalidPoint) as info:
            group.decode_point(data, "test point")
        assert "test point" in str(info.value), name
    with pytest.raises(group.InvalidPoint, match="identity"):
        group.decode_point(bytes(32))
    with pytest.raises(group.InvalidPoint):
        group.decode_point("not bytes")
    # most random strings are not encodings of group elements; decode_point agrees with the
    # definition that valid encodings are even, below p, and decode (checked by libsodium)
    rejected = 0
    for _ in range(200):
        data = os.urandom(32)
        try:
            group.decode_point(data)
        except group.InvalidPoint:
            rejected += 1
        else:
            n = int.from_bytes(data, "little")
            assert n < P and n % 2 == 0
    assert rejected > 150


# -- fixed-key AES hashes from their definitions ---------------------------------------------------
KEY = hashlib.sha256(b"shardlm/ot fixed-key AES-128 permutation v1").digest()[:16]


def _aes(block: bytes) -> bytes:
    return Cipher(algorithms.AES(KEY), modes.ECB()).encryptor().update(block)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def _sigma(block: bytes) -> bytes:
    x = int.from_bytes(block, "little")
    xl, xr = x >> 64, x & (2**64 - 1)  # x_L is the high half
    return (((xl ^ xr) << 64) | xl).to_bytes(16, "little")


def _rows():
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 2**64, (64, 2), dtype=np.uint64, endpoint=False)
    rows[0] = 0
    rows[1] = 2**64 - 1
    rows[2] = (1, 0)
    return rows


def test_fixed_key_is_the_documented_one():
    assert prims.FIXED_KEY == KEY


def test_mmo_ccr_hash_known_answers():
    rows = _rows()
    got = prims.ccr_hash(rows)
    for i, row in enumerate(rows):
        x = row.tobytes()
        s = _sigma(x)
        assert got[i].tobytes() == _xor(_aes(s), s), i
    # a pinned value too (H(0) = AES_k(0) since σ(0) = 0)
    assert got[0].tobytes() == _aes(bytes(16))


def test_tccr_hash_known_answers():
    rows = _rows()
    tw = prims.tweaks(1000, len(rows), domain=5)
    got = prims.tccr_hash(rows, tw)
    for i, row in enumerate(rows):
        tweak = ((5 << 64) | (1000 + i)).to_bytes(16, "little")
        px = _aes(row.tobytes())
        assert got[i].tobytes() == _xor(_aes(_xor(px, tweak)), px), i


def test_expand_known_answers():
    keys = _rows()[:5]
    out = prims.expand(keys, 40, domain=3)
    assert out.shape == (5, 40)
    for i, k in enumerate(keys):
        want = b""
        for t in range(3):
            x = _xor(k.tobytes(), ((3 << 120) | t).to_bytes(16, "little"))
            want += _xor(_aes(_sigma(x)), _sigma(x))
        assert out[i].tobytes() == want[:40]


def test_column_prg_is_one_aes_ctr_stream_across_chunks():
    seed = os.urandom(16)
    prg = prims.ColumnPRG(seed)
    parts = []
    for n in (16, 1000, 8192):
        buf = np.empty(n, dtype=np.uint8)
        prg.next_into(buf, bytes(n))
        parts.append(buf.tobytes())
    ref = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(16 + 1000 + 8192))
    assert b"".join(parts) == ref


@pytest.mark.parametrize("m", [64, 128, 640, 1 << 16])
def test_transpose_matches_the_bit_definition(m):
    rows = np.frombuffer(os.urandom(128 * m // 8), dtype=np.uint8).reshape(128, m // 8)
    keep = rows.copy()
    got = prims.transpose_128xm(rows)
    assert np.array_equal(rows, keep)  # not in place unless asked
    bits = np.unpackbits(rows, axis=1, bitorder="little")  # bits[i, j] = bit j of row i
    want = np.packbits(bits.T, axis=1, bitorder="little")  # row j = bits[., j]
    assert np.array_equal(got.view(np.uint8).reshape(m, 16), want)
    assert np.array_equal(prims.transpose_128xm(rows.copy(), inplace=True), got)


def test_random_bits_are_balanced():
    bits = prims.random_bits(200_000)
    assert set(np.unique(bits)) <= {0, 1}
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / np.sqrt(bits.size)
