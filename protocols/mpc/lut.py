"""Nonlinear functions on additive shares by lookup tables over 1-of-N OT (v3-ot's core step).

The step (SIRNN, Rathee et al. S&P 2021; Pika, Wagh PETS 2022). A real ``x`` is the ring element
``v = round(x 2^F)`` shared additively, ``v = v_s + v_r mod 2^64`` between the OT *sender* S
and the OT *receiver* R. For a table over the public input range [lo, hi] with 2^k entries:

1. Scale, locally: ``u = (v - enc(lo)) M + 2^(64-k) mod 2^64`` (both multiply their share by
   the public integer M; R adds the public constant), with M the largest for which the range
   fills buckets 1 .. 2^k - 1 of the top k bits (bucket 0 is a guard, below).
2. Truncate each share locally to its top k bits: ``a = u_r >> (64-k)``, ``b = u_s >> (64-k)``.
   Then ``i = a + b mod 2^k`` is the true bucket ``t = u >> (64-k)`` or ``t - 1`` (the carry out
   of the two low parts is lost). The tables tolerate that off-by-one: entry i holds f at the
   boundary ``lo + i w`` between the two buckets it may stand for (w = 2^(64-k-F) / M, the bucket
   width), so the error is at most ``w max|f'|`` over two buckets; the guard bucket 0 keeps
   ``t - 1`` from wrapping round to the top of the table.
3. One 1-of-2^k OT per element (protocols/ot/nofn.py over IKNP): S draws a fresh ``s_out``
   (CSPRNG) and offers ``T[j] = enc(f_{(j + b) mod 2^k}) - s_out`` for all j (its table rotated
   by its own index share); R chooses ``j = a`` and obtains ``f_i - s_out``; S keeps ``s_out``.
   The two outputs are additive shares of ``f(x)``. One round per table (R's IKNP columns, then
   S's ciphertexts), however many elements.

Privacy (semi-honest). S sees only IKNP's columns, independent of R's choices. R sees its chosen
entry ``f_i - s_out``, uniform because ``s_out`` is fresh per element, and the other 2^k - 1
entries under pads it cannot compute (nofn's PRF keys); the rotation by ``b`` is hidden by
``s_out`` too. Inputs outside [lo, hi] wrap modulo 2^64 to an unrelated entry: the caller keeps
them in range (clipping by secure comparison stays with the engine, compare.py).

Cost per evaluation: ``2^k 8`` bytes S -> R plus ``16 k`` bytes R -> S (IKNP), one round for a
whole batch. The seeds claim 48 KB per nonlinear evaluation; every table below costs less.

Tables (F = 20 fraction bits in and out; bytes per evaluation each way; w the bucket width; the
max error measured on shares over the whole range, 2 10^5 points, and the bound ``w max|f'|``
that tests/test_lut.py asserts):

============  ==============  ==  ==========  ========  =======  ===========  ==========
table         input range     k   S -> R      R -> S    w        measured     bound
============  ==============  ==  ==========  ========  =======  ===========  ==========
exp           [-12, 0]        10  8 KiB       160 B     1.2e-2   abs 1.1e-2   abs 1.2e-2
sigmoid       [-8, 8]         9   4 KiB       144 B     3.1e-2   abs 7.8e-3   abs 8.0e-3
gelu_gate     [-8, 8]         12  32 KiB      192 B     3.9e-3   abs 1.5e-3   abs 2.0e-3
reciprocal    [1, 64]         12  32 KiB      192 B     1.5e-2   rel 1.5e-2   rel 1.6e-2
rsqrt         [0.25, 64]      12  32 KiB      192 B     1.6e-2   rel 2.8e-2   rel 3.2e-2
rsqrt_mant.   [1, 4]          13  64 KiB      208 B     3.7e-4   rel 1.8e-4   rel 1.9e-4
ltz (x < 0)   [-4000, 4000]   8   2 KiB       128 B     31.4     exact for |x| >= w (a 0/1 integer)
============  ==============  ==  ==========  ========  =======  ===========  ==========

exp serves the softmax's ``x - max`` (exp(-12) = 6e-6 next to a row sum >= 1); reciprocal
its row sum for up to 64 keys (the start of Newton's iteration: approx_lut.py); sigmoid the SiLU
gate ``x sigmoid(x)``, gelu_gate GPT-2's GELU ``x gelu_gate(x)`` (``gelu(x) / x``), each then one
product; ltz a comparison (relu, the max) with an error zone of one bucket around 0;
rsqrt_mantissa (``rsqrt_mant.``) the norms' rsqrt after the exponent is split off (approx_lut.py:
the mantissa ``x 4^-j`` in [1, 4)), read at whatever scale the caller's product leaves it (its
``frac``), so no truncation comes before the lookup; k = 13 for v3-mpc's 2e-4 without a Newton step
(above the seeds' 48 KB, but one lookup per norm row: ~4 MB of a SmolLM2 token).

The k were picked for accuracy first, then bytes; the errors scale as 2^-k, so one more bit halves
them and doubles the bytes. exp and sigmoid run per score and per MLP gate element (SmolLM2: 46080
gates per token), so they are as small as SmolLM2's accuracy allows: teacher-forced top-1 over
200 tokens (`python -m shardlm.protocols.mpc.accuracy 200 1 ot`) is 200/200 with both at k = 12
on [-16, 16] and [-16, 0] (median logit error 0.025), 199/200 at k = 9 on [-8, 8] and k = 10 on
[-12, 0] (the one miss a reference tie of 0.001; median 0.12), 198/200 with exp at k = 9 too;
sigmoid(8) = 0.99966, so clipping the gate at +-8 costs < 4e-4 |x|. The rest stay at k = 12:
gelu_gate (GPT-2 only, not measured on a real model), reciprocal (once per softmax row; a
finer start saves Newton rounds). (A table of SiLU
itself needs k = 13, 64 KiB, for 4.3e-3 on [-16, 16], and grows with the range because SiLU does:
a table of the bounded gate and one product is cheaper.) Uniform buckets are
what limits reciprocal and rsqrt: their relative error is ``w / x`` (``w / 2x``), worst at lo.
What single tables cannot do, stated plainly: reciprocal and rsqrt over the wide ranges v3-mpc serves (the norms' 1e9) need an
exponent/mantissa split (the exponent by comparisons, a product by it, a fine table for the
mantissa: approx_lut.py does this for rsqrt), and inputs beyond a table's range need clipping
first (the engine's comparisons).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from ..ot import nofn, prims
from ..ot.iknp import IknpReceiver, IknpSender
from .beaver_ot import ot_provider, ring_words
from .shares import Shared

FRAC_BITS = 20
_RING = 1 << 64


def encode(x, bits: int = FRAC_BITS) -> np.ndarray:
    """Reals -> ring elements (uint64) at scale 2^bits, rounded; negative values wrap."""
    return np.round(np.asarray(x, dtype=np.float64) * float(1 << bits)).astype(np.int64).view(np.uint64)


def decode(v, bits: int = FRAC_BITS) -> np.ndarray:
    return np.asarray(v, dtype=np.uint64).view(np.int64).astype(np.float64) / float(1 << bits)


def random_ring(n: int) -> np.ndarray:
    """n uniform ring elements from the CSPRNG: the sender's output shares s_out."""
    return prims.random_bytes(8 * n).view(np.uint64)


def share(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ring values into two uniform additive shares (tests and the simulator)."""
    r = random_ring(v.size).reshape(v.shape)
    return v - r, r


@dataclasses.dataclass(frozen=True)
class Table:
    """f over the input range [lo, hi] as 2^k entries; see the module docstring for the indexing."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    lo: float
    hi: float
    k: int
    frac: int = FRAC_BITS  # of the input
    out_frac: int = FRAC_BITS  # of the output (0: an integer, e.g. a bit)

    @property
    def n(self) -> int:
        return 1 << self.k

    @property
    def mult(self) -> int:
        """M: the largest public integer with (hi - lo) 2^F M inside the 2^k - 1 usable buckets of
        2^(64-k) (a multiplication by M is exact on each share: no power of two is needed)."""
        span = math.ceil((self.hi - self.lo) * (1 << self.frac)) + 1
        m = ((self.n - 1) << (64 - self.k)) // span
        if m < 1:
            raise ValueError(f"table {self.name}: the range does not fit the ring at {self.frac} fraction bits")
        return m

    @property
    def width(self) -> float:
        """The bucket width in real units."""
        return 2.0 ** (64 - self.k - self.frac) / self.mult

    @property
    def bytes_per_eval(self) -> tuple[int, int]:
        """(sender -> receiver, receiver -> sender) bytes of OT traffic per element."""
        return self.n * 8, 16 * self.k

    def entries(self) -> np.ndarray:
        """Entry i = f at the boundary lo + i w between the buckets i and i + 1 (the index is the
        true bucket or one less), clamped to the range; uint64 at scale 2^F."""
        x = np.clip(self.lo + np.arange(self.n) * self.width, self.lo, self.hi)
        return encode(self.fn(x), self.out_frac)

    def index_share(self, v: np.ndarray, offset: bool) -> np.ndarray:
        """A party's share of the table index: its top k bits of the scaled input (``offset``: the
        party that adds the public constants, the receiver)."""
        u = np.asarray(v, dtype=np.uint64) * np.uint64(self.mult)
        if offset:
            c = (-round(self.lo * (1 << self.frac)) * self.mult + (1 << (64 - self.k))) % _RING
            u = u + np.uint64(c)
        return (u >> np.uint64(64 - self.k)).astype(np.int64)

    def plain(self, x: np.ndarray) -> np.ndarray:
        return self.fn(np.asarray(x, dtype=np.float64))


# -- the core step, generic over per-element tables ------------------------------------------------
async def offer(ch, sender: IknpSender, count: int, rows: Callable[[int, int], np.ndarray], n: int) -> np.ndarray:
    """The sender of ``count`` table lookups: ``rows(t0, t1)`` gives the (t1 - t0, n) uint64 tables
    of elements t0..t1-1 (already rotated by the sender's own data); each is offered minus a fresh
    ``s_out`` of that element. Returns the sender's output shares s_out. One round."""
    s_out = random_ring(count)

    def messages(t0, t1):
        return (rows(t0, t1) - s_out[t0:t1, None]).view(np.uint8).reshape(t1 - t0, n, 8)
    messages.shape = (n, 8)
    await nofn.send(ch, sender, messages, count=count)
    return s_out


async def choose(ch, receiver: IknpReceiver, index: np.ndarray, n: int) -> np.ndarray:
    """The receiver of len(index) table lookups: its output shares T_t[index[t]]."""
    got = await nofn.receive(ch, receiver, np.asarray(index, dtype=np.int64).reshape(-1), n, 8)
    return got.view(np.uint64).reshape(-1)


def rotated(base: np.ndarray, b: np.ndarray, t0: int, t1: int) -> np.ndarray:
    """Rows t0..t1-1 of the tables ``base[(j + b_t) mod n]``."""
    n = base.size
    return base[(np.arange(n)[None, :] + b[t0:t1, None]) % n]


async def lut_send(ch, sender: IknpSender, table: Table, v_s: np.ndarray) -> np.ndarray:
    """The sender's half of ``f(x)`` for its input shares ``v_s`` (any shape): its output shares."""
    b = table.index_share(v_s.reshape(-1), offset=False)
    base = table.entries()
    s_out = await offer(ch, sender, b.size, lambda t0, t1: rotated(base, b, t0, t1), table.n)
    return s_out.reshape(v_s.shape)


async def lut_recv(ch, receiver: IknpReceiver, table: Table, v_r: np.ndarray) -> np.ndarray:
    """The receiver's half: its output shares of ``f(x)``."""
    a = table.index_share(v_r.reshape(-1), offset=True)
    return (await choose(ch, receiver, a, table.n)).reshape(v_r.shape)


def lut_plain_index(table: Table, v_s: np.ndarray, v_r: np.ndarray) -> np.ndarray:
    """The index the two shares select (for tests: what the OT's receiver will obtain)."""
    return (table.index_share(v_s, False) + table.index_share(v_r, True)) % table.n


# -- the tables -------------------------------------------------------------------------------------
def _sigmoid(x):
    return 0.5 * (1 + np.tanh(x / 2))  # no overflow for large |x|


def _gelu_gate(x):
    """gelu_tanh(x) / x: 0 and 1 within 1e-14 at -8 and 8, so clipping x there costs nothing."""
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


TABLES = {t.name: t for t in [
    Table("exp", np.exp, -12.0, 0.0, 10),
    Table("sigmoid", _sigmoid, -8.0, 8.0, 9),
    Table("gelu_gate", _gelu_gate, -8.0, 8.0, 12),
    Table("reciprocal", lambda x: 1 / x, 1.0, 64.0, 12),
    Table("rsqrt", lambda x: 1 / np.sqrt(x), 0.25, 64.0, 12),
    Table("rsqrt_mantissa", lambda x: 1 / np.sqrt(x), 1.0, 4.0, 13),
    Table("ltz", lambda x: (x < 0).astype(np.float64), -4000.0, 4000.0, 8, out_frac=0),
]}


# -- on the engine's shares (the two-party simulator or one party of the networked protocol) -------
def on_shares(engine, x, table: Table):
    """``f(x)`` for a :class:`shares.Shared` ``x`` by ``table``: the server is the table's sender
    (rotating by its index share), the client its receiver. The lookups run on the IKNP extensions
    of the engine's OT provider (``--triples ot``: beaver_ot's parties, over the session channel
    when networked, in memory in the simulator), in the same order on both sides like its triples,
    so no request message is needed. One round for the whole tensor."""
    p = ot_provider(engine, "table lookups")

    def ring(a):
        return torch.from_numpy(a.view(np.int64).reshape(x.shape))

    async def client(ch):
        return (ring(await lut_recv(ch, p.client.receiver, table, ring_words(x.c))),)

    async def server(ch):
        return (ring(await lut_send(ch, p.server.sender, table, ring_words(x.s))),)

    (c,), (s,) = p._run(client, server)  # a party gets VOID for the other's
    return Shared(c, s)


def measure(t: Table, points: int = 200_000, seed: int = 0) -> dict:
    """Max error of ``t`` on shares over its whole range: random two-party splits of ``points``
    inputs (both ends included), each looked up at the index its shares select (what the OT
    delivers, tests/test_lut.py)."""
    x = np.concatenate([[t.lo, t.hi], np.random.default_rng(seed).uniform(t.lo, t.hi, points - 2)])
    v = encode(x, t.frac)
    v_s, v_r = share(v)
    got = decode(t.entries()[lut_plain_index(t, v_s, v_r)], t.out_frac)
    want = t.plain(decode(v, t.frac))
    err = np.abs(got - want)
    return {"abs": float(err.max()), "rel": float((err / np.maximum(np.abs(want), 1e-300)).max()),
            "wrong_within": float(np.abs(x[err > 0]).max()) if (err > 0).any() else 0.0}


if __name__ == "__main__":  # the module docstring's table
    print(f"{'table':12s} {'range':>16s} {'k':>3s} {'S->R B':>8s} {'R->S B':>7s} {'w':>9s} {'max abs':>9s} {'max rel':>9s}")
    for t in TABLES.values():
        m = measure(t)
        err = f"wrong only within {m['wrong_within']:.3g} of 0" if t.out_frac == 0 else f"{m['abs']:9.3g} {m['rel']:9.3g}"
        print(f"{t.name:12s} {f'[{t.lo:g}, {t.hi:g}]':>16s} {t.k:3d} {t.bytes_per_eval[0]:8d} {t.bytes_per_eval[1]:7d} "
              f"{t.width:9.3g} {err}")
