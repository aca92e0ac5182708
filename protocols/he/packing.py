"""Cheetah's coefficient encoding of a matrix product (Huang et al., USENIX Security 2022, sec. 3).

To get ``Y = X W^T`` (X: V vectors of length n_in, W: n_out x n_in) from plaintext-ciphertext
products in Z_t[x]/(x^N + 1) with no rotations: cut X's columns into blocks of m, W's rows into
blocks of n, and take k vectors per polynomial, with k*m*n <= N. Then

    input  poly of (vector group g, column block a): coefficient c*m*n + i     = X[g*k + c, a*m + i]
    weight poly of (column block a, row block b):    coefficient j*m + m-1-i   = W[b*n + j, a*m + i]

and their product holds at coefficient c*m*n + j*m + m-1 the inner product of vector g*k + c with
row b*n + j over block a; summing over a gives Y. (Terms past x^N wrap, negated, only into
coefficients below m-1, which are never read; tests/test_he.py checks the identity against a
plain negacyclic product.) One input ciphertext serves every row block, one weight plaintext
every vector group, so costs are: ceil(V/k)*ceil(n_in/m) ciphertexts up, ceil(V/k)*ceil(n_out/n)
down, ceil(n_in/m)*ceil(n_out/n) weight encodings and ceil(V/k)*that many products. ``choose``
picks (k, m, n) minimising a cost in milliseconds measured on these machines.

Pure numpy (uint64 arithmetic wraps mod 2^64; everything here is reduced mod t at the end).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Milliseconds on one core (tests/he probe, N=8192, two 60-bit data primes): per ciphertext up
# (client encrypt + serialize, transfer, server load + NTT), per ciphertext down (server inverse
# NTT + serialize, transfer, client decrypt), per weight polynomial (encode + NTT), per product
# (NTT-form multiply and accumulate).
COST_UP, COST_DOWN, COST_WEIGHT, COST_PRODUCT = 3.6, 2.9, 0.35, 0.124


@dataclasses.dataclass(frozen=True)
class Packing:
    n_in: int
    n_out: int
    vectors: int
    k: int  # vectors per polynomial
    m: int  # columns per block
    n: int  # rows per block
    N: int

    @property
    def groups(self) -> int:
        return math.ceil(self.vectors / self.k)

    @property
    def in_blocks(self) -> int:
        return math.ceil(self.n_in / self.m)

    @property
    def out_blocks(self) -> int:
        return math.ceil(self.n_out / self.n)

    @property
    def cts_up(self) -> int:
        return self.groups * self.in_blocks

    @property
    def cts_down(self) -> int:
        return self.groups * self.out_blocks

    @property
    def products(self) -> int:
        return self.groups * self.in_blocks * self.out_blocks

    def cost_ms(self) -> float:
        return (self.cts_up * COST_UP + self.cts_down * COST_DOWN
                + self.in_blocks * self.out_blocks * COST_WEIGHT + self.products * COST_PRODUCT)


def choose(n_in: int, n_out: int, vectors: int, N: int) -> Packing:
    """The cheapest packing (a deterministic function of the shape: both parties compute it)."""
    if min(n_in, n_out, vectors) < 1:
        raise ValueError(f"empty product: {vectors} vectors of {n_in} -> {n_out}")
    best = None
    k_max = 1 << max(vectors - 1, 0).bit_length()
    ks = [1 << e for e in range(N.bit_length()) if (1 << e) <= min(k_max, N)]
    ms = sorted({1 << e for e in range(N.bit_length()) if (1 << e) <= n_in} | ({n_in} if n_in <= N else set()))
    for k in ks:
        for m in ms:
            if k * m > N:
                continue
            p = Packing(n_in, n_out, vectors, k, m, min(n_out, N // (k * m)), N)
            if best is None or p.cost_ms() < best.cost_ms():
                best = p
    return best


def pack_inputs(p: Packing, X: np.ndarray) -> np.ndarray:
    """X (vectors, n_in) uint64 -> (groups * in_blocks, N) coefficient rows, group-major."""
    out = np.zeros((p.groups, p.in_blocks, p.N), np.uint64)
    pad = np.zeros((p.groups * p.k, p.in_blocks * p.m), np.uint64)
    pad[:p.vectors, :p.n_in] = X
    blocks = pad.reshape(p.groups, p.k, p.in_blocks, p.m).transpose(0, 2, 1, 3)  # (g, a, c, i)
    view = out[:, :, :p.k * p.m * p.n].reshape(p.groups, p.in_blocks, p.k, p.m * p.n)
    view[:, :, :, :p.m] = blocks
    return out.reshape(p.groups * p.in_blocks, p.N)


def weight_poly(p: Packing, W: np.ndarray, a: int, b: int, t: int) -> np.ndarray:
    """The plaintext of column block ``a``, row block ``b``: W (n_out, n_in) signed ints mod t."""
    block = np.zeros((p.n, p.m), np.int64)
    rows = W[b * p.n:(b + 1) * p.n, a * p.m:(a + 1) * p.m]
    block[:rows.shape[0], :rows.shape[1]] = rows
    out = np.zeros(p.N, np.uint64)
    out[:p.n * p.m] = (block[:, ::-1].reshape(-1) % t).astype(np.uint64)
    return out


def unpack_outputs(p: Packing, polys: np.ndarray) -> np.ndarray:
    """(groups * out_blocks, N) decrypted coefficient rows -> Y (vectors, n_out) uint64 mod t."""
    view = polys.reshape(p.groups, p.out_blocks, p.N)[:, :, :p.k * p.m * p.n]
    # coefficient c*m*n + j*m + m-1 -> (g, b, c, j)
    y = view.reshape(p.groups, p.out_blocks, p.k, p.n, p.m)[..., p.m - 1]
    y = y.transpose(0, 2, 1, 3).reshape(p.groups * p.k, p.out_blocks * p.n)
    return np.ascontiguousarray(y[:p.vectors, :p.n_out])
