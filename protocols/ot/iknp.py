"""IKNP OT extension (semi-honest), and the OT flavours built on it.

Roles are reversed for the base OTs: the extension *sender* S draws Δ ∈ {0,1}^128 and receives
one key of each of 128 base OTs, k_i^{Δ_i}; the extension *receiver* R is the base-OT sender and
holds both keys (k_i^0, k_i^1). Per chunk of m OTs with choice bits r ∈ {0,1}^m:

    R:  t_i = G(k_i^0),  u_i = t_i ⊕ G(k_i^1) ⊕ r        (i = 0..127, m bits each)
    R -> S: u (16 bytes per OT, message OT_EXT_U)
    S:  q_i = G(k_i^{Δ_i}) ⊕ Δ_i·u_i = t_i ⊕ Δ_i·r
    transpose: row j of Q is q_j = t_j ⊕ r_j·Δ
    S:  m_j^0 = H(j, q_j),  m_j^1 = H(j, q_j ⊕ Δ)          R:  m_j^{r_j} = H(j, t_j)

G is AES-128-CTR per column (a stream continued across chunks); H is the tweakable
circular-correlation-robust fixed-key-AES hash of prims.tccr_hash with the global OT index j as
tweak. Security: the sender sees u_i = G(k_i^0) ⊕ G(k_i^1) ⊕ r and holds only k_i^{Δ_i}, so the
other PRG output G(k_i^{1-Δ_i}) one-time-pads r: its view is independent of the choices. The
receiver's other message H(j, t_j ⊕ Δ) is a correlation-robust hash at an offset Δ it does not
know. Assumptions: those of the base OT (CDH in ristretto255, ROM), a secure PRG (AES-CTR),
and correlation robustness of H (fixed-key AES as an ideal permutation). Semi-honest only.

Malicious security (KOS15) is not implemented. Its place is :meth:`IknpSender._consistency_check`
/ :meth:`IknpReceiver._consistency_check`, called once per batch after the u chunks: the
sender would send a random seed for coefficients χ_j, the receiver reply x = Σ χ_j·r_j and
t = Σ χ_j·t_j over GF(2^128) (on 128 + 40 extra OTs that are then discarded), and the sender
check Σ χ_j·q_j = t ⊕ x·Δ. The hash is already the tweakable one KOS needs.

Streaming: batches are processed in chunks of ``CHUNK`` OTs (a multiple of 128), so memory is
bounded by the chunk for random OT (``*_chunks`` generators) and by the caller's own inputs
and outputs for the other flavours. Random OT is one flight (R -> S). Correlated and
chosen-message OT are pipelined: the sender answers each u chunk with that chunk's
corrections (S -> R) at once, while the receiver keeps streaming u from one task and reads
corrections from another (``_pipelined``), so nobody waits for a reply and no socket buffer can
fill up on both sides at once. The channel counts each change of direction as a round; the
latency cost is still one round trip.

A ``*_chunks`` generator must be run to the end: both parties' PRG streams and OT indices
advance per chunk, and stopping early on one side desynchronises the extension.
"""

from __future__ import annotations

import numpy as np
import trio

from ...party.channel import Channel, concurrently
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from . import base, prims

KAPPA = prims.KAPPA
CHUNK = 1 << 16


def _padded(m: int) -> int:
    return -(-m // KAPPA) * KAPPA


def _bits(choices) -> np.ndarray:
    c = np.asarray(choices)
    if c.dtype == np.bool_:
        return c.astype(np.uint8).reshape(-1)
    c = c.astype(np.uint8, copy=False).reshape(-1)
    if c.size and c.max() > 1:
        raise ValueError("choice bits must be 0 or 1")
    return c


def _scratch(owner, name: str, size: int) -> np.ndarray:
    """A reusable flat uint8 buffer (memory touched for the first time is slow here, DESIGN
    s10). Safe to reuse across chunks: Channel.send has handed the bytes to the stream when it
    returns."""
    bufs = owner.__dict__.setdefault("_bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.size < size:
        buf = bufs[name] = np.empty(size, dtype=np.uint8)
    return buf[:size]


def pad_bytes(blocks: np.ndarray, nbytes: int, domain: int = 1) -> np.ndarray:
    """Pads of ``nbytes`` from each random OT block: the block itself if it is long enough,
    else its expansion (prims.expand)."""
    if nbytes <= 16:
        return blocks.view(np.uint8).reshape(-1, 16)[:, :nbytes]
    return prims.expand(blocks, nbytes, domain)


class IknpSender:
    """The OT-extension sender: Δ and the 128 PRG seeds k_i^{Δ_i}."""

    def __init__(self, delta_bits: np.ndarray, seeds: list[bytes]):
        self.delta_bits = _bits(delta_bits)
        self.delta = np.packbits(self.delta_bits, bitorder="little").view(np.uint64).reshape(1, 2)
        self._prgs = [prims.ColumnPRG(k) for k in seeds]
        # 0xFF on the rows where Δ_i = 1: q = G(k) ⊕ (u & mask) without fancy indexing (10x faster)
        self._mask = np.where(self.delta_bits.astype(bool), 0xFF, 0).astype(np.uint8)[:, None]
        self.count = 0  # OTs produced so far: the next tweak

    @classmethod
    async def setup(cls, ch: Channel) -> "IknpSender":
        delta = prims.random_bits(KAPPA)
        with ch.phase("ot-base"):
            seeds = await base.receive(ch, delta)
        return cls(delta, seeds)

    async def random_chunks(self, ch: Channel, n: int):
        """Yield (offset, m0, m1) for n random OTs, chunk by chunk ((m, 2) uint64 blocks)."""
        done = 0
        while done < n:
            m = min(CHUNK, n - done)
            mp = _padded(m)
            u = (await ch.expect(MsgType.OT_EXT_U)).body.get("u")
            if not isinstance(u, np.ndarray) or u.dtype != np.uint8 or u.shape != (KAPPA, mp // 8):
                raise ProtocolError(ErrorCode.MALFORMED, f"OT_EXT_U: expected a {KAPPA} x {mp // 8} uint8 matrix")
            q = prims.fill_rows(self._prgs, _scratch(self, "q", KAPPA * mp // 8 + 16), mp // 8)
            tmp = _scratch(self, "tmp", KAPPA * mp // 8)[:q.size].reshape(q.shape)
            np.bitwise_and(u, self._mask, out=tmp)
            q ^= tmp
            rows = prims.transpose_128xm(q, inplace=True)[:m]
            tw = prims.tweaks(self.count, m)
            m0 = prims.tccr_hash(rows, tw)
            rows ^= self.delta
            m1 = prims.tccr_hash(rows, tw)
            self.count += m
            yield done, m0, m1
            done += m
        self._consistency_check()

    def _consistency_check(self) -> None:
        """KOS15 check goes here (see module docstring); semi-honest IKNP has none."""

    async def random(self, ch: Channel, n: int) -> tuple[np.ndarray, np.ndarray]:
        m0 = np.empty((n, 2), dtype=np.uint64)
        m1 = np.empty((n, 2), dtype=np.uint64)
        async for off, a, b in self.random_chunks(ch, n):
            m0[off:off + len(a)] = a
            m1[off:off + len(b)] = b
        return m0, m1

    async def correlated(self, ch: Channel, delta: np.ndarray) -> np.ndarray:
        """Correlated OT over Z_2^64: return x (uniform); the receiver gets x + c_j·Δ_j mod 2^64.

        ``delta``: (n,) or (n, k) uint64. (For Gilboa products the sender's additive share of
        c·Δ is -x, the receiver's is its output.)
        """
        delta = np.asarray(delta, dtype=np.uint64)
        shape = delta.shape
        if delta.ndim not in (1, 2):
            raise ValueError("delta must be (n,) or (n, k) uint64")
        d2 = delta.reshape(shape[0], 1) if delta.ndim == 1 else delta
        k = d2.shape[1]
        x = np.empty_like(d2)
        corr = np.empty_like(d2)
        async for off, m0, m1 in self.random_chunks(ch, shape[0]):
            sl = slice(off, off + len(m0))
            x[sl] = pad_bytes(m0, 8 * k).view(np.uint64)
            corr[sl] = x[sl] + d2[sl] - pad_bytes(m1, 8 * k).view(np.uint64)
            await _send_rows(ch, {"d": corr[sl]})
        return x.reshape(shape)

    async def chosen(self, ch: Channel, msg0: np.ndarray, msg1: np.ndarray) -> None:
        """Chosen-message OT: messages are (n, L) uint8 rows; the receiver gets msg_{c_j}[j]."""
        msg0 = np.ascontiguousarray(msg0, dtype=np.uint8)
        msg1 = np.ascontiguousarray(msg1, dtype=np.uint8)
        if msg0.shape != msg1.shape or msg0.ndim != 2:
            raise ValueError("chosen-message OT needs two (n, L) uint8 arrays of the same shape")
        n, L = msg0.shape
        e0 = np.empty_like(msg0)
        e1 = np.empty_like(msg1)
        async for off, m0, m1 in self.random_chunks(ch, n):
            sl = slice(off, off + len(m0))
            np.bitwise_xor(msg0[sl], pad_bytes(m0, L), out=e0[sl])
            np.bitwise_xor(msg1[sl], pad_bytes(m1, L), out=e1[sl])
            await _send_rows(ch, {"e0": e0[sl], "e1": e1[sl]})


class IknpReceiver:
    """The OT-extension receiver: both seeds of each of the 128 base OTs."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]):
        self._prg0 = [prims.ColumnPRG(k0) for k0, _ in pairs]
        self._prg1 = [prims.ColumnPRG(k1) for _, k1 in pairs]
        self.count = 0

    @classmethod
    async def setup(cls, ch: Channel) -> "IknpReceiver":
        with ch.phase("ot-base"):
            pairs = await base.send(ch, KAPPA)
        return cls(pairs)

    async def random_chunks(self, ch: Channel, choices):
        """Yield (offset, m_c) for random OTs with the given choice bits ((m, 2) uint64 blocks)."""
        r = _bits(choices)
        n = r.size
        done = 0
        while done < n:
            m = min(CHUNK, n - done)
            mp = _padded(m)
            rbits = np.zeros(mp, dtype=np.uint8)
            rbits[:m] = r[done:done + m]
            rpacked = np.packbits(rbits, bitorder="little")
            t = prims.fill_rows(self._prg0, _scratch(self, "t", KAPPA * mp // 8 + 16), mp // 8)
            u = prims.fill_rows(self._prg1, _scratch(self, "u", KAPPA * mp // 8 + 16), mp // 8)
            u ^= t
            u ^= rpacked
            await ch.send(MsgType.OT_EXT_U, {"u": u})
            rows = prims.transpose_128xm(t, inplace=True)[:m]
            mc = prims.tccr_hash(rows, prims.tweaks(self.count, m))
            self.count += m
            yield done, mc
            done += m
        self._consistency_check()

    def _consistency_check(self) -> None:
        """KOS15 check goes here (see module docstring); semi-honest IKNP has none."""

    async def random(self, ch: Channel, choices) -> np.ndarray:
        r = _bits(choices)
        out = np.empty((r.size, 2), dtype=np.uint64)
        async for off, mc in self.random_chunks(ch, r):
            out[off:off + len(mc)] = mc
        return out

    async def correlated(self, ch: Channel, choices, k: int = 1) -> np.ndarray:
        """Correlated OT over Z_2^64: x + c_j·Δ_j (shape (n,) for k = 1, else (n, k))."""
        r = _bits(choices)
        y = np.empty((r.size, k), dtype=np.uint64)

        async def produce():
            async for off, mc in self.random_chunks(ch, r):
                y[off:off + len(mc)] = pad_bytes(mc, 8 * k).view(np.uint64)

        corr = (await _pipelined(ch, produce, {"d": np.empty((r.size, k), dtype=np.uint64)}))["d"]
        sel = r.astype(bool)
        y[sel] += corr[sel]
        return y.reshape(-1) if k == 1 else y

    async def chosen(self, ch: Channel, choices, nbytes: int) -> np.ndarray:
        """Chosen-message OT: return (n, nbytes) uint8, row j = the sender's msg_{c_j}[j]."""
        r = _bits(choices)
        pads = np.empty((r.size, nbytes), dtype=np.uint8)

        async def produce():
            async for off, mc in self.random_chunks(ch, r):
                pads[off:off + len(mc)] = pad_bytes(mc, nbytes)

        got = await _pipelined(ch, produce, {"e0": np.empty((r.size, nbytes), dtype=np.uint8),
                                             "e1": np.empty((r.size, nbytes), dtype=np.uint8)})
        e0, e1 = got["e0"], got["e1"]
        out = np.where(r.astype(bool)[:, None], e1, e0)
        out ^= pads
        return out


_ROW_BYTES_PER_MESSAGE = 16 << 20


async def _send_rows(ch: Channel, arrays: dict) -> None:
    """Send equal-length arrays as OT_EXT_CORR messages of at most ~16 MiB each."""
    n = len(next(iter(arrays.values())))
    row_bytes = sum(a[:1].nbytes for a in arrays.values()) or 1
    step = max(1, _ROW_BYTES_PER_MESSAGE // row_bytes)
    for off in range(0, n, step):
        await ch.send(MsgType.OT_EXT_CORR, {k: a[off:off + step] for k, a in arrays.items()})


async def _pipelined(ch: Channel, produce, into: dict) -> dict:
    """Run ``produce`` (which streams u chunks) while a second task fills the preallocated
    arrays ``into`` from OT_EXT_CORR messages, in order, until every row has arrived.

    The sender answers each u chunk with its corrections at once, so both directions flow
    together; because this side always reads, neither side can block for good on a full
    socket buffer."""
    n = len(next(iter(into.values())))

    async def consume():
        got = 0
        while got < n:
            body = (await ch.expect(MsgType.OT_EXT_CORR)).body
            parts = [body.get(k) for k in into]
            rows = len(parts[0]) if isinstance(parts[0], np.ndarray) else -1
            for (k, dst), a in zip(into.items(), parts):
                if not isinstance(a, np.ndarray) or a.dtype != dst.dtype or a.shape[1:] != dst.shape[1:] \
                        or len(a) != rows or not 0 < rows <= n - got:
                    raise ProtocolError(ErrorCode.MALFORMED, f"OT_EXT_CORR: bad {k!r} block at row {got} of {n}")
                dst[got:got + rows] = a
            got += rows

    await concurrently(produce, consume)
    return into
