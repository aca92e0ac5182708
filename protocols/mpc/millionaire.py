"""The carry of a two-party sum by the millionaires' protocol over 1-of-N OT (v3-ot's comparisons).

``ltz`` (compare.py) needs XOR shares of bit ``p`` of ``xc + xs``, each addend held by one party.
That bit is ``xc_p ^ xs_p ^ carry`` with ``carry = [(xc mod 2^p) + (xs mod 2^p) >= 2^p] = [y < x]``
for ``y = 2^p - 1 - (xs mod 2^p)`` (the server's) and ``x = xc mod 2^p`` (the client's): a
comparison of two private values, the millionaires' problem. Here it is solved as in CrypTFlow2
(Rathee et al., CCS 2020, section 3) instead of by a Kogge-Stone adder over AND triples:

1. Both split their value into ``q = ceil(p / m)`` digits of ``w = ceil(p / q) <= m`` bits (least
   significant first; the top digit may be shorter, its OT still 1-of-2^w).
2. Per digit one 1-of-2^w OT (nofn.py over IKNP), the server the sender: for every ``j`` it offers
   the byte ``([y_i < j] ^ r_lt) | ([y_i == j] ^ r_eq) << 1`` with fresh CSPRNG bits ``r_lt, r_eq``
   (per digit and element); the client chooses ``j = x_i``. So the two hold XOR shares of
   ``lt_i = [y_i < x_i]`` and ``eq_i = [y_i == x_i]`` (the server's are its r's). One round for all
   digits of all comparisons of a batch.
3. The digits are combined in a tree, pairs of adjacent nodes (hi, lo) at a time:
   ``lt = lt_hi ^ (eq_hi & lt_lo)``, ``eq = eq_hi & eq_lo`` (the two terms of ``lt`` exclude each
   other, so XOR is their OR). The ANDs are on XOR-shared bits by the provider's AND triples,
   64 bits packed to a triple word, one round per tree level. A node holding the lowest digit is
   never a ``hi``: its ``eq`` is never needed and not computed, so ``2 (q - 1) - ceil(log2 q)``
   ANDs in all.

Rounds: 1 (the OT) + ceil(log2 q) AND rounds, against Kogge-Stone's 1 + ceil(log2 p).

Privacy (semi-honest). The server receives IKNP's columns (independent of the client's digits)
and the AND openings (masked by the triples' uniform bits). The client receives, per digit, one
byte whose two bits are masked by the fresh ``r_lt, r_eq``, and the other 2^w - 1 entries under
nofn's pads, then the AND openings. Reusing an ``r`` would hand the client the XOR of two
comparison bits; tests/test_millionaire.py checks both views and fails on such a variant.

Cost per comparison (bytes of OT traffic, both directions; an AND bit costs 32 bytes of random
OT to make, 16 each way, beaver_ot.py, and 1/8 byte each way to open): ``q (16 w + 2^w)`` for the
OTs plus ``32 (2 (q - 1) - ceil(log2 q))`` for the AND triples. Kogge-Stone takes
``2 ceil(log2 p)`` whole AND words (64 bits each, 2 KiB to make) per comparison. Counted by
``python -m shardlm.protocols.mpc.millionaire`` (the OT bytes measured; the rounds include the OT):

====  ===========================  ====================  ====================  ====================
p     Kogge-Stone                  m = 2                 m = 4                 m = 6
====  ===========================  ====================  ====================  ====================
16    5 rounds, 16384 B            4 rounds, 640 B       3 rounds, 448 B       3 rounds, 544 B
32    6 rounds, 20480 B            5 rounds, 1408 B      4 rounds, 992 B       4 rounds, 1184 B
63    7 rounds, 24576 B            6 rounds, 2976 B      5 rounds, 2112 B      5 rounds, 2273 B
====  ===========================  ====================  ====================  ====================

(m = 3 and 5 lie between; m = 4 is the cheapest or within 1% at every p.) p = 16 is v3-ot's bounded
comparison (the SiLU's clip, the softmax's floor), 32 the max's, 63 an unbounded ltz. CPU: the
1-of-16 OTs of 1-byte entries cost ~10 us per comparison at p = 16 (both parties on one core,
load ~2), most of it nofn's sender keys (16 entries x 4 hashes per digit, ~0.1 us per
entry); with its AND triples made in the same run a comparison takes a quarter (p = 16) to a half
(p = 63) of Kogge-Stone's time (whose triples are the bulk of its work).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..ot import nofn, prims
from ..ot.iknp import IknpReceiver, IknpSender
from .beaver_ot import OTProvider, ot_provider, ring_words
from .shares import Shared, cat
from .void import real

DIGIT_BITS = 4  # m: the digits' width (bytes measured in the module __main__)
_BITS = torch.arange(64, dtype=torch.int64)


def split(p: int, m: int) -> tuple[int, int]:
    """``(q, w)``: p bits as q digits of w <= m bits (as even as possible; the top one shorter)."""
    q = -(-p // m)
    return q, -(-p // q)


def digits(v: np.ndarray, p: int, m: int) -> np.ndarray:
    """(T,) uint64 -> (T, q) int64: the w-bit digits of ``v mod 2^p``, least significant first."""
    q, w = split(p, m)
    v = np.asarray(v, dtype=np.uint64) & np.uint64((1 << p) - 1)
    shifts = np.uint64(w) * np.arange(q, dtype=np.uint64)
    return ((v[:, None] >> shifts) & np.uint64((1 << w) - 1)).astype(np.int64)


def random_bits(n: int) -> np.ndarray:
    """The server's fresh output shares r_lt, r_eq (CSPRNG; 0/1 uint8)."""
    return prims.random_bits(n)


def entries(y: np.ndarray, w: int, r_lt: np.ndarray, r_eq: np.ndarray) -> np.ndarray:
    """(n,) server digits and mask bits -> the (n, 2^w, 1) uint8 tables the server offers: entry j
    is ``([y < j] ^ r_lt) | ([y == j] ^ r_eq) << 1``."""
    j = np.arange(1 << w)
    lt = (y[:, None] < j).astype(np.uint8) ^ r_lt[:, None]
    eq = (y[:, None] == j).astype(np.uint8) ^ r_eq[:, None]
    return (lt | (eq << 1))[..., None]


# -- the OT step: the server offers, the client chooses ---------------------------------------------
async def offer(ch, sender: IknpSender, y: np.ndarray, p: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The server (OT sender) with ``y`` (T,) uint64: its XOR shares of the digits' ``lt`` and
    ``eq`` bits, (T, q) uint8 each. One round (IKNP columns in, tables out)."""
    q, w = split(p, m)
    d = digits(y, p, m).reshape(-1)
    r = random_bits(2 * d.size)
    r_lt, r_eq = r[:d.size], r[d.size:]

    def messages(t0, t1):
        return entries(d[t0:t1], w, r_lt[t0:t1], r_eq[t0:t1])
    messages.shape = (1 << w, 1)
    await nofn.send(ch, sender, messages, count=d.size)
    return r_lt.reshape(-1, q), r_eq.reshape(-1, q)


async def choose(ch, receiver: IknpReceiver, x: np.ndarray, p: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The client (OT receiver) with ``x`` (T,) uint64: its XOR shares, (T, q) uint8 each."""
    q, w = split(p, m)
    got = (await nofn.receive(ch, receiver, digits(x, p, m).reshape(-1), 1 << w, 1)).reshape(-1, q)
    return got & 1, (got >> 1) & 1


# -- the tree: ANDs on XOR-shared bits ----------------------------------------------------------------
def _xor(a: Shared, b: Shared) -> Shared:
    return Shared(a.c ^ b.c, a.s ^ b.s)


def combine(lt: Shared, eq: Shared, and_round) -> Shared:
    """XOR shares (T, q) of the digits' ``lt`` bits and (T, q - 1) of the ``eq`` bits of digits
    1..q-1 (digit 0's is never needed) -> XOR shares (T,) of ``[y < x]``. ``and_round(pairs)``:
    the ANDs of a list of pairs of XOR-shared 0/1 tensors, all in one round."""
    while lt.shape[-1] > 1:
        n, h = lt.shape[-1], lt.shape[-1] // 2
        # node i's eq is eq[..., i - 1]: the hi nodes 1, 3, .., 2h - 1; the lo nodes 2, 4, .., 2h - 2
        # (pair 0's lo holds digit 0: its new node needs no eq)
        pairs = [(eq.map(lambda t: t[..., 0:2 * h - 1:2]), lt.map(lambda t: t[..., 0:2 * h:2]))]
        if h > 1:
            pairs.append((eq.map(lambda t: t[..., 2:2 * h - 1:2]), eq.map(lambda t: t[..., 1:2 * h - 2:2])))
        got = and_round(pairs)
        lt_new, eq_new = _xor(lt.map(lambda t: t[..., 1:2 * h:2]), got[0]), got[1:]
        if n % 2:  # the top node waits a level
            lt_new = cat([lt_new, lt.map(lambda t: t[..., n - 1:])], -1)
            eq_new = eq_new + [eq.map(lambda t: t[..., n - 2:])]
        lt = lt_new
        eq = cat(eq_new, -1) if len(eq_new) > 1 else eq_new[0] if eq_new else None
    return lt.map(lambda t: t[..., 0])


def _pack(t: torch.Tensor) -> torch.Tensor:
    """(n,) 0/1 int64 -> (ceil(n / 64),) words, bit j of word i from element 64 i + j (zeros after n)."""
    pad = (-t.numel()) % 64
    t = torch.cat([t, t.new_zeros(pad)]) if pad else t
    return torch.bitwise_left_shift(t.view(-1, 64), _BITS).sum(1)  # disjoint bits: the sum is their OR


def _unpack(w: torch.Tensor, n: int) -> torch.Tensor:
    return (torch.bitwise_right_shift(w.view(-1, 1), _BITS) & 1).view(-1)[:n]


def and_bits(engine, pairs: list[tuple[Shared, Shared]]) -> list[Shared]:
    """The ANDs of XOR-shared 0/1 tensors in one round of ``engine``: all bits packed 64 to a word,
    so an AND bit costs one bit of an AND triple (not a whole word, as an unpacked bit would)."""
    sizes = [a.numel() for a, _ in pairs]
    flat = [(a.map(lambda t: t.reshape(-1)), b.map(lambda t: t.reshape(-1))) for a, b in pairs]
    A, B = (cat([f[j] for f in flat], 0).map(_pack) for j in (0, 1))
    (z,) = engine._and_many([(A, B)], 64)
    z = z.map(lambda t: _unpack(t, sum(sizes)))
    at = np.cumsum([0] + sizes)
    return [z.map(lambda t, a=a, b=b, s=x.shape: t[a:b].view(s)) for a, b, (x, _) in zip(at, at[1:], pairs)]


# -- on the engine's shares (the two-party simulator or one party of the networked protocol) -------
def sum_bit(engine, xc: torch.Tensor, xs: torch.Tensor, p: int, m: int = DIGIT_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """XOR shares (client's, server's) of bit ``p`` of ``xc + xs`` mod 2^64, each party holding its
    own addend (:meth:`compare.Compare._sum_bit`'s contract). The OTs run on the IKNP extensions of
    the engine's OT provider like lut.on_shares' (in memory in the simulator, over the session
    channel in a party), in the same order on both sides, so no request message is needed."""
    def bit_p(t):
        return torch.bitwise_right_shift(t, p) & 1

    if p < 1:  # nothing carries into bit 0
        return bit_p(xc), bit_p(xs)
    prov = ot_provider(engine, "the millionaires' comparisons")
    shape = real(xc, xs).shape

    def ring(a):
        return torch.from_numpy(a.astype(np.int64))

    async def client(ch):
        return tuple(map(ring, await choose(ch, prov.client.receiver, ring_words(xc), p, m)))

    async def server(ch):  # y = 2^p - 1 - (xs mod 2^p) = ~xs mod 2^p
        return tuple(map(ring, await offer(ch, prov.server.sender, ~ring_words(xs), p, m)))

    (lc, ec), (ls, es) = prov._run(client, server)  # a party gets VOID for the other's
    engine.stats.rounds += 1  # the OT: IKNP columns to the server, its tables back
    eq = Shared(ec, es).map(lambda t: t[:, 1:])
    carry = combine(Shared(lc, ls), eq, lambda pairs: and_bits(engine, pairs))
    return bit_p(xc) ^ carry.c.view(shape), bit_p(xs) ^ carry.s.view(shape)


def costs(p: int, m: int) -> dict:
    """Per comparison: rounds, AND bits, and bytes of OT traffic (both directions) of this protocol."""
    q, w = split(p, m)
    ands = 2 * (q - 1) - math.ceil(math.log2(q)) if q > 1 else 0
    return {"rounds": 1 + math.ceil(math.log2(q)) if q > 1 else 1, "ands": ands,
            "ot_bytes": q * (16 * w + (1 << w)), "and_bytes": 32 * ands}


if __name__ == "__main__":  # the module docstring's table: bytes and time per comparison for m = 2..6
    from .engine import Engine

    torch.set_num_threads(1)
    n = 2048
    # one AND pool made beforehand for every run (the offline phase): online time and OT bytes only
    e = Engine(OTProvider(batch=1 << 17, prefill_and=True))
    e.provider.prefill()
    print(f"{n} comparisons in one batch, in memory (both parties on this core), AND triples made beforehand;\n"
          "per comparison: the OT bytes (measured), the AND triples' (bits used x 32 B), online time")
    print(f"{'p':>3s} {'m':>3s} {'q':>3s} {'w':>2s} {'rounds':>6s} {'ANDs':>4s} {'OT B':>6s} {'AND B':>6s} {'total B':>7s} {'us':>6s}")
    for p in (16, 32, 63):
        for m in [None, *range(2, 7)]:  # None: Kogge-Stone, for reference
            xc, xs = e.prg.ring(n), e.prg.ring(n)
            b0, w0, r0, t0 = e.provider.ot_bytes, e.provider.elements.get("and", 0), e.stats.rounds, time.perf_counter()
            got = e._sum_bit(xc, xs, p) if m is None else sum_bit(e, xc, xs, p, m)
            dt = time.perf_counter() - t0
            assert torch.equal(got[0] ^ got[1], torch.bitwise_right_shift(xc + xs, p) & 1)
            assert e.provider.elements["and"] <= 1 << 17, "the AND pool ran out: the OT bytes would hold a refill"
            words = e.provider.elements.get("and", 0) - w0
            ot = (e.provider.ot_bytes - b0) / n
            ands = words * 64 / n if m is None else costs(p, m)["ands"]  # Kogge-Stone: whole words
            q, w = split(p, m) if m else (0, 0)
            print(f"{p:3d} {m or 'KS':>3} {q:3d} {w:2d} {e.stats.rounds - r0:6d} {ands:4.0f} {ot:6.0f} {32 * ands:6.0f} "
                  f"{ot + 32 * ands:7.0f} {dt / n * 1e6:6.1f}")
