"""``--offline he``: the server computes the client's ``W r`` on ciphertexts (Delphi's offline phase
with Cheetah's packing, protocols/he/packing.py), so the client needs no weight matrix.

Per unit (and per block of a precomposed unit, units.blocks) the client draws mask rows
``r'`` as always (a seed, protocols/ring.mask_rows) and reads them mod t = 2^59, encrypts them
under its own secret key and sends the ciphertexts (HE_PRODUCT); the server multiplies them by
its integer weights in NTT form, accumulates, and returns the product ciphertexts
(HE_PRODUCT_OK); the client decrypts ``W r' mod 2^59``. The online mask is ``r = 2^5 r'``
(SHIFT = 64 - 59), whose product the client then knows exactly in Z_2^64:

    W r mod 2^64 = 2^5 (W r' mod 2^59)

so one plaintext product per mask row suffices (a 64-bit product from a 59-bit plaintext
modulus would otherwise need two limbs: twice the work and the bytes). The client encodes its
activations 5 bits higher (``x 2^5``, fractional bits chosen for |2^5 W x| < 2^62: for SmolLM2
~17 instead of ~22 on the widest products, an absolute error of 2^-18 on values ~3000), so
``m = 2^5 (x - r')``: uniform over the multiples of 2^5, i.e. a one-time pad of Z_2^59; its low
5 bits are always zero and carry nothing. The client shifts the unmasked product back down.
Material made this way says so in its meta (``mask_shift``, protocols/preprocess).

What the server sees: BFV ciphertexts under a key it never gets (semantic security under RLWE:
128-bit parameters, protocols/he/bfv.py), the unit names and row counts (public: the schedule).
It learns nothing about r, so the online phase's ``m = x - r`` stays a one-time pad.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ...wire.schema import Bytes, Int, Schema, Str, Tensor
from . import bfv, packing

SHIFT = 64 - bfv.LOG_T  # the online masks are 2^SHIFT r', r' read mod t
# ciphertexts per message each way (~63 MB at 262 KB each, under the wire's 2^26-element tensor limit): a
# request covers as many rows as fit
MAX_CTS = 240

HE_SETUP = Schema("HE_SETUP", params=Bytes())
HE_SETUP_OK = Schema("HE_SETUP_OK")
HE_PRODUCT = Schema("HE_PRODUCT", unit=Str(choices="units"), block=Int(lo=0), rows=Int(lo=1),
                    cts=Tensor("uint8", ("cts", "ct_bytes")))
HE_PRODUCT_OK = Schema("HE_PRODUCT_OK", cts=Tensor("uint8", ("cts", "ct_bytes")), cpu_us=Int(lo=0))


def packing_for(in_len: int, out_len: int, rows: int) -> packing.Packing:
    """Both parties' packing of one request: one vector per mask row."""
    return packing.choose(in_len, out_len, rows, bfv.N)


def rows_per_request(in_len: int, out_len: int, rows: int) -> int:
    """The most rows one request may carry with at most MAX_CTS ciphertexts each way."""
    n = rows
    while n > 1:
        p = packing_for(in_len, out_len, n)
        if p.cts_up <= MAX_CTS and p.cts_down <= MAX_CTS:
            break
        n = (n + 1) // 2
    return n


# -- server ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    """One plain product inside a unit: ``out[o0:o0+no] = W_int @ in[i0:i0+ni]``."""

    i0: int
    o0: int
    ints: np.ndarray  # (no, ni) int32, the server's integer weights

    @property
    def shape(self) -> tuple[int, int]:
        return self.ints.shape


def server_products(block: Block, rows: int, cts: np.ndarray, full: bool = False) -> tuple[np.ndarray, int]:
    """The product ciphertexts for one request (a worker thread's job: seconds of SEAL calls).
    Returns the serialized results (cts_down, ct_bytes) and the thread CPU microseconds spent.
    An all-zero result row stands for an all-zero product block (SEAL refuses to make a
    ciphertext that a zero plaintext would leave transparent). ``full``: whole ciphertexts instead
    of :func:`compact` rows (for measuring their noise)."""
    import seal

    t0 = time.thread_time()
    n_out, n_in = block.shape
    p = packing_for(n_in, n_out, rows)
    if cts.shape[0] != p.cts_up:
        raise bfv.HEError(f"{rows} rows of a {n_out}x{n_in} block take {p.cts_up} ciphertexts, got {cts.shape[0]}")
    ctx = bfv.context()
    ev = seal.Evaluator(ctx)
    inputs = []
    for raw in cts:
        ct = bfv.load_ciphertext(raw.tobytes())
        ev.transform_to_ntt_inplace(ct)
        inputs.append(ct)
    acc = [[None] * p.out_blocks for _ in range(p.groups)]
    W = block.ints
    for a in range(p.in_blocks):
        for b in range(p.out_blocks):
            coeffs = packing.weight_poly(p, W, a, b, bfv.T)
            if not coeffs.any():
                continue
            w = bfv.plaintext(coeffs)
            ev.transform_to_ntt_inplace(w, ctx.first_parms_id())
            for g in range(p.groups):
                prod = ev.multiply_plain(inputs[g * p.in_blocks + a], w)
                if acc[g][b] is None:
                    acc[g][b] = prod
                else:
                    ev.add_inplace(acc[g][b], prod)
    out = np.zeros((p.cts_down, bfv.CIPHERTEXT_BYTES if full else reply_bytes(p)), np.uint8)
    for g in range(p.groups):
        for b in range(p.out_blocks):
            if acc[g][b] is not None:
                ev.transform_from_ntt_inplace(acc[g][b])
                raw = acc[g][b].to_string()
                out[g * p.out_blocks + b] = np.frombuffer(raw, np.uint8) if full else compact(raw, p)
    return out, int((time.thread_time() - t0) * 1e6)


# A product ciphertext goes back without the c0 coefficients the client never reads: decryption
# (c0 + c1 s, then scaling) works coefficient by coefficient, so zeros there only spoil unread
# outputs (layout: bfv.CT_HEADER). Down bytes: ~half.


def output_positions(p: packing.Packing) -> np.ndarray:
    """The coefficients of an output polynomial the client reads (packing.unpack_outputs)."""
    c, j = np.meshgrid(np.arange(p.k), np.arange(p.n), indexing="ij")
    return (c * p.m * p.n + j * p.m + p.m - 1).reshape(-1)


def reply_bytes(p: packing.Packing) -> int:
    return bfv.CT_HEADER + 8 * bfv.DATA_PRIMES * (bfv.N + p.k * p.n)


def compact(raw: bytes, p: packing.Packing) -> np.ndarray:
    """A serialized product ciphertext -> header, c1 whole, c0 at the read coefficients."""
    if len(raw) != bfv.CIPHERTEXT_BYTES:
        raise bfv.HEError(f"a product ciphertext of {len(raw)} bytes, expected {bfv.CIPHERTEXT_BYTES}")
    polys = np.frombuffer(raw, np.uint64, offset=bfv.CT_HEADER).reshape(2, bfv.DATA_PRIMES, bfv.N)
    return np.concatenate([np.frombuffer(raw[:bfv.CT_HEADER], np.uint8), polys[1].reshape(-1).view(np.uint8),
                           polys[0][:, output_positions(p)].reshape(-1).view(np.uint8)])


def expand(row: np.ndarray, p: packing.Packing) -> bytes:
    """:func:`compact`'s row -> a full serialized ciphertext with zeros at c0's unread coefficients."""
    at = bfv.CT_HEADER + 8 * bfv.DATA_PRIMES * bfv.N
    c1 = row[bfv.CT_HEADER:at].view(np.uint64).reshape(bfv.DATA_PRIMES, bfv.N)
    c0 = np.zeros((bfv.DATA_PRIMES, bfv.N), np.uint64)
    c0[:, output_positions(p)] = row[at:].view(np.uint64).reshape(bfv.DATA_PRIMES, -1)
    return row[:bfv.CT_HEADER].tobytes() + c0.tobytes() + c1.tobytes()


# -- client ------------------------------------------------------------------------------------
def plaintext_rows(r: np.ndarray) -> np.ndarray:
    """Mask rows r' (rows, k) as ring elements -> their residues mod t (uint64 < t)."""
    return r.view(np.uint64) & np.uint64(bfv.T - 1)


def shifted(y: np.ndarray) -> np.ndarray:
    """Decrypted products W r' mod t -> the material's W (2^SHIFT r') mod 2^64, as int64."""
    return (y.astype(np.uint64) << np.uint64(SHIFT)).view(np.int64)


@dataclasses.dataclass
class Costs:
    """What the HE offline phase cost, for reports: CPU on each side, ciphertexts each way."""

    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    cts_up: int = 0
    cts_down: int = 0
    products: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Encryptor:
    """The client's side of one session: its key, and per request the packing, encryption and
    decryption. The I/O lives with the caller (masked.py's HE source), so this runs in tests
    against ``server_products`` directly."""

    def __init__(self):
        t0 = time.thread_time()
        self.keys = bfv.Keys()
        self.costs = Costs(client_cpu_s=time.thread_time() - t0)

    def encrypt(self, r: np.ndarray, out_len: int) -> tuple[packing.Packing, np.ndarray]:
        t0 = time.thread_time()
        rows, in_len = r.shape
        p = packing_for(in_len, out_len, rows)
        polys = packing.pack_inputs(p, plaintext_rows(r))
        cts = np.stack([np.frombuffer(self.keys.encrypt(poly), np.uint8) for poly in polys])
        self.costs.client_cpu_s += time.thread_time() - t0
        self.costs.cts_up += len(polys)
        return p, cts

    def decrypt(self, p: packing.Packing, cts: np.ndarray) -> np.ndarray:
        t0 = time.thread_time()
        if cts.shape[0] != p.cts_down:
            raise bfv.HEError(f"the server returned {cts.shape[0]} ciphertexts, expected {p.cts_down}")
        polys = np.stack([np.zeros(bfv.N, np.uint64) if not raw.any() else self.keys.decrypt(expand(raw, p))
                          for raw in cts])
        wr = shifted(packing.unpack_outputs(p, polys))
        self.costs.client_cpu_s += time.thread_time() - t0
        self.costs.cts_down += len(polys)
        self.costs.products += p.products
        return wr
