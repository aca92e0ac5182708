"""Symmetric building blocks of OT extension, all vectorised over whole chunks.

Blocks. A 128-bit block is two little-endian uint64 words: ``block[..., 0]`` holds bits 0..63
(bytes 0..7 of its 16-byte encoding), ``block[..., 1]`` bits 64..127. Arrays of blocks have
shape (n, 2) and dtype uint64; their bytes are the concatenated 16-byte encodings, which is
what AES sees.

Fixed-key AES. ``PI`` is AES-128 under a public, fixed key (the SHA-256 of a label below),
modelled as a random permutation π (the ideal-permutation model that emp-toolkit and libOTe
rely on for the same hashes). Two hashes are built from it (Guo, Katz, Wang, Yu, "Efficient and
secure multiparty computation from fixed-key block ciphers", S&P 2020):

- ``ccr_hash(x) = π(σ(x)) ⊕ σ(x)`` with the orthomorphism σ(x_L ‖ x_R) = (x_L ⊕ x_R) ‖ x_L,
  where x_L is the high word and x_R the low word: a circular-correlation-robust hash (MMO).
- ``tccr_hash(x, i) = π(π(x) ⊕ i) ⊕ π(x)``: a tweakable circular-correlation-robust hash; the
  tweak ``i`` (a 64-bit OT index in the low word, a domain tag in the high word) keeps every
  hash query distinct. IKNP uses this one: semi-honest IKNP needs only correlation robustness,
  but the tweak is what the KOS (malicious) variant requires, so adding KOS later does not
  change the hash.

Each hash is one or two ``update`` calls of AES-ECB over all rows at once; there is no
per-row Python work anywhere in this module.

PRG. ``ColumnPRG`` is AES-128-CTR keyed by a 16-byte base-OT seed (nonce 0); it is a stream,
so successive chunks continue where the previous one stopped.

Transpose. ``transpose_128xm`` turns 128 rows of m bits into m rows of 128 bits (the IKNP
matrix flip) with a recursive 64x64 bit transpose by delta swaps on uint64 words, vectorised
over all blocks (about 1 ms per 2^16 OTs), instead of unpackbits/packbits (~25x slower).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KAPPA = 128
FIXED_KEY = hashlib.sha256(b"shardlm/ot fixed-key AES-128 permutation v1").digest()[:16]
_PI = Cipher(algorithms.AES(FIXED_KEY), modes.ECB()).encryptor()  # ECB is stateless: reusable


def as_blocks(data) -> np.ndarray:
    """View bytes / a uint8 array whose size is a multiple of 16 as (n, 2) uint64 blocks."""
    arr = np.frombuffer(data, dtype=np.uint64) if isinstance(data, (bytes, bytearray)) else \
        np.ascontiguousarray(data).view(np.uint64)
    return arr.reshape(-1, 2)


def pi(blocks: np.ndarray) -> np.ndarray:
    """The fixed-key permutation on every block of an (n, 2) uint64 array."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint64)
    if blocks.size == 0:
        return blocks.copy()
    out = np.empty(blocks.nbytes + 16, dtype=np.uint8)  # update_into wants a block of slack
    _PI.update_into(memoryview(blocks).cast("B"), out)
    return out[:blocks.nbytes].view(np.uint64).reshape(blocks.shape)


def sigma(blocks: np.ndarray) -> np.ndarray:
    """σ(x_L ‖ x_R) = (x_L ⊕ x_R) ‖ x_L, with x_L the high word (index 1)."""
    out = np.empty_like(blocks)
    np.bitwise_xor(blocks[:, 1], blocks[:, 0], out=out[:, 1])
    out[:, 0] = blocks[:, 1]
    return out


def ccr_hash(blocks: np.ndarray) -> np.ndarray:
    """MMO with σ: H(x) = π(σ(x)) ⊕ σ(x), for every row of an (n, 2) uint64 array."""
    s = sigma(blocks)
    out = pi(s)
    out ^= s
    return out


def tweaks(start: int, n: int, domain: int = 0) -> np.ndarray:
    """The tweak blocks start, ..., start+n-1 (low word) with ``domain`` in the high word."""
    t = np.empty((n, 2), dtype=np.uint64)
    t[:, 0] = np.arange(start, start + n, dtype=np.uint64)
    t[:, 1] = domain
    return t


def tccr_hash(blocks: np.ndarray, tweak: np.ndarray) -> np.ndarray:
    """H(x, i) = π(π(x) ⊕ i) ⊕ π(x) for every row; ``tweak`` is an (n, 2) block array."""
    p = pi(blocks)
    out = pi(p ^ tweak)
    out ^= p
    return out


def expand(keys: np.ndarray, nbytes: int, domain: int = 1) -> np.ndarray:
    """Stretch each 128-bit key (rows of an (n, 2) array) into ``nbytes`` pseudorandom bytes.

    Word t of row r is ccr_hash(key_r ⊕ (t ‖ domain)): a PRG in the ideal-permutation model for
    uniformly random secret keys. Returns (n, nbytes) uint8.
    """
    n = keys.shape[0]
    nblocks = -(-nbytes // 16)
    x = np.empty((n, nblocks, 2), dtype=np.uint64)
    x[:] = keys[:, None, :]
    x[:, :, 0] ^= np.arange(nblocks, dtype=np.uint64)[None, :]
    x[:, :, 1] ^= np.uint64(domain << 56)
    out = ccr_hash(x.reshape(-1, 2)).view(np.uint8).reshape(n, nblocks * 16)
    return out[:, :nbytes]


class ColumnPRG:
    """AES-128-CTR keystream under a 16-byte seed; ``next(nbytes)`` continues the stream."""

    def __init__(self, seed: bytes):
        if len(seed) != 16:
            raise ValueError("a column PRG seed is 16 bytes")
        self._enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()

    def next_into(self, out: np.ndarray, zeros: bytes) -> None:
        out[:] = np.frombuffer(self._enc.update(zeros), dtype=np.uint8)


def fill_rows(prgs: list[ColumnPRG], flat: np.ndarray, row_bytes: int) -> np.ndarray:
    """Write the next ``row_bytes`` of each PRG's stream as consecutive rows of ``flat`` (a
    uint8 buffer with at least 16 bytes to spare after the rows: AES ``update_into`` asks for
    a block of slack) without intermediate copies; return the (len(prgs), row_bytes) view."""
    zeros = bytes(row_bytes)
    for i, prg in enumerate(prgs):
        prg._enc.update_into(zeros, flat[i * row_bytes:])
    return flat[:len(prgs) * row_bytes].reshape(len(prgs), row_bytes)


def random_bytes(n: int) -> np.ndarray:
    """n bytes from a CSPRNG (AES-CTR under an os.urandom key: fast for large n)."""
    if n <= 4096:
        return np.frombuffer(os.urandom(n), dtype=np.uint8).copy()
    enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor()
    return np.frombuffer(enc.update(bytes(n)), dtype=np.uint8).copy()


def random_bits(n: int) -> np.ndarray:
    """n uniform bits as a uint8 array of 0/1."""
    return np.unpackbits(random_bytes(-(-n // 8)), bitorder="little")[:n]


# -- the 128 x m bit transpose -------------------------------------------------------------------
# (shift j, mask of the low j bits of every 2j-bit lane): the stages of a recursive 64x64 transpose
_STAGES = [(np.uint64(j), np.uint64(m), j) for j, m in (
    (32, 0x00000000FFFFFFFF), (16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F), (2, 0x3333333333333333), (1, 0x5555555555555555))]


def transpose_128xm(rows: np.ndarray, inplace: bool = False) -> np.ndarray:
    """(128, m/8) uint8 (row i = bits of column i, little-endian bit order) -> (m, 2) uint64.

    Output row j holds bit j of every input row: bit i of the 128-bit output block j is bit j
    of input row i. m must be a multiple of 64. With ``inplace`` the input is used as scratch.

    Method: view the matrix as (128, m/64) uint64 words, i.e. two stacked rows of 64x64 bit
    blocks, and transpose every block at once with six delta-swap stages (block j swaps the
    off-diagonal j x j sub-blocks of every 2j x 2j block: t = ((lo >> j) ^ hi) & mask;
    hi ^= t; lo ^= t << j), vectorised over all blocks; then one uint64 copy interleaves the
    two 64-bit halves of each output row.
    """
    k, nbytes = rows.shape
    if k != KAPPA or nbytes % 8:
        raise ValueError(f"expected a {KAPPA} x (multiple of 8) byte matrix, got {rows.shape}")
    if inplace and rows.flags.c_contiguous:
        words = rows.view(np.uint64)
    else:
        words = np.array(rows, dtype=np.uint8, order="C", copy=True).view(np.uint64)
    W = nbytes // 8
    scratch = np.empty(64 * W, dtype=np.uint64)
    for shift, mask, j in _STAGES:
        v = words.reshape(2, 64 // (2 * j), 2, j, W)
        lo, hi = v[:, :, 0], v[:, :, 1]
        t = scratch.reshape(lo.shape)
        np.right_shift(lo, shift, out=t)
        t ^= hi
        t &= mask
        hi ^= t
        np.left_shift(t, shift, out=t)
        lo ^= t
    # words[64h + c, w] now has bit r = input bit (row 64h + r, column 64w + c)
    return np.ascontiguousarray(words.reshape(2, 64, W).transpose(2, 1, 0)).reshape(W * 64, 2)
