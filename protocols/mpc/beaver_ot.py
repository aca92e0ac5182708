"""Dealer-free Beaver triples: client and server make them jointly by Gilboa multiplication
over IKNP correlated OT (protocols/ot/iknp.py), so that nobody knows a, b or c.

Each party draws its own shares ``a_p, b_p`` (uniform, :class:`ring.MaskPRG`). Then
``c = a b = a_c b_c + a_s b_s + a_c b_s + a_s b_c``: the first two terms are local, each cross
term is one Gilboa product. For ``u`` held by the OT sender and ``v`` by the receiver, the
receiver's choice bits are the 64 bits ``v_j`` of ``v``; OT number j carries the correlation
``Δ_j = u 2^j``; the receiver gets ``x_j + v_j u 2^j``, the sender keeps ``-x_j``; summed
over j the shares add to ``u v mod 2^64``. 64 correlated OTs (and 8 bytes of correction
each) per cross-term element: 128 OTs per elementwise triple.

A matrix triple ``C = A @ B`` (A: m x k, B: k x n) uses the vector form: the receiver's choice
bits are the bits of ``B_s[t, q]`` (k n 64 OTs), OT (t, q, j) correlates the whole column
``A_c[:, t] 2^j`` (m ring elements), and summing over t and j gives shares of
``(A_c @ B_s)[:, q]``: k n 64 OTs of m elements each, instead of m k n 64.

Boolean (AND) triples: XOR shares of words a, b, c with ``c = a & b`` bitwise (64 bit triples
per int64 word), from random OT with no further message. Per bit,
``c = a_c b_c ^ a_s b_s ^ a_c b_s ^ a_s b_c``; for the cross term ``a_c b_s`` the client is the
sender of one random OT (m0, m1) and the server the receiver with choice bit ``b_s`` (its own
random bit, :class:`ring.MaskPRG`). With ``x0 = lsb(m0)``, ``x1 = lsb(m1)`` the sender *defines*
its bit ``a_c := x0 ^ x1`` and keeps ``x0``; the receiver gets ``lsb(m_{b_s}) = x0 ^ b_s a_c``,
so the two hold XOR shares of ``a_c b_s``. The server's random OTs as sender give ``a_s`` and the
share of ``a_s b_c`` likewise. ``a_c`` is uniform to the server (it knows only ``m_{b_s}``, and
``m_{1-b_s}`` is a correlation-robust hash it cannot compute), ``b_s`` to the client (IKNP hides
the choices). One random OT per bit and direction, 16 bytes of OT_EXT_U each: 32 bytes per AND
bit, one flight each way per pool.

Both directions run as two IKNP extensions (client as sender for ``a_c``-terms, server as
sender for ``a_s``-terms). Semi-honest, like the IKNP engine underneath.

:class:`OTProvider` in this module runs both parties in one process over an in-memory stream
pair (the two-party simulator of protocols/mpc/engine.py); the networked offline phase between a
client and a server is :class:`NetOTProvider` (used by protocols/mpc/service.py).
"""

from __future__ import annotations

import numpy as np
import torch
import trio
import trio.testing

from ...party.channel import Channel, concurrently
from .. import ring
from ..ot.iknp import IknpReceiver, IknpSender
from . import beaver
from .void import VOID

_SHIFTS = np.arange(64, dtype=np.uint64)


def _bits64(v: np.ndarray) -> np.ndarray:
    """(n,) uint64 -> (n * 64,) uint8: bit j of element i at i*64 + j."""
    return ((v.reshape(-1, 1) >> _SHIFTS) & np.uint64(1)).astype(np.uint8).reshape(-1)


async def gilboa_send(ch: Channel, sender: IknpSender, u: np.ndarray) -> np.ndarray:
    """Elementwise: this party's share of ``u * v`` (v held by the receiver). u: (n,) uint64."""
    delta = (u.reshape(-1, 1) << _SHIFTS).reshape(-1)  # (n*64,)
    x = await sender.correlated(ch, delta)
    return -(x.reshape(-1, 64).sum(axis=1, dtype=np.uint64))


async def gilboa_recv(ch: Channel, receiver: IknpReceiver, v: np.ndarray) -> np.ndarray:
    y = await receiver.correlated(ch, _bits64(v))
    return y.reshape(-1, 64).sum(axis=1, dtype=np.uint64)


async def gilboa_matmul_send(ch: Channel, sender: IknpSender, A: np.ndarray, n: int) -> np.ndarray:
    """Share of ``A @ B`` with A: (m, k) here, B: (k, n) at the receiver. Returns (m, n)."""
    m, k = A.shape
    cols = A.T.reshape(k, 1, 1, m)  # column t of A
    delta = np.broadcast_to(cols << _SHIFTS.reshape(1, 1, 64, 1), (k, n, 64, m)).reshape(-1, m)
    x = await sender.correlated(ch, np.ascontiguousarray(delta))
    return -(x.reshape(k, n, 64, m).sum(axis=(0, 2), dtype=np.uint64).T)


async def gilboa_matmul_recv(ch: Channel, receiver: IknpReceiver, B: np.ndarray, m: int) -> np.ndarray:
    k, n = B.shape
    y = await receiver.correlated(ch, _bits64(B.reshape(-1)), k=m)
    return np.ascontiguousarray(y.reshape(k, n, 64, m).sum(axis=(0, 2), dtype=np.uint64).T)


async def and_send(ch: Channel, sender: IknpSender, n: int) -> tuple[np.ndarray, np.ndarray]:
    """As the random-OT sender for ``n`` words of AND bits: (this party's ``a`` bits, its XOR share
    of ``a & b_other``), both (n,) uint64, bit j of word i from OT i*64 + j."""
    x0 = np.empty(64 * n, dtype=np.uint8)
    x1 = np.empty(64 * n, dtype=np.uint8)
    async for off, m0, m1 in sender.random_chunks(ch, 64 * n):
        sl = slice(off, off + len(m0))
        np.bitwise_and(m0.view(np.uint8)[:, 0], 1, out=x0[sl])  # lsb of each 16-byte block
        np.bitwise_and(m1.view(np.uint8)[:, 0], 1, out=x1[sl])
    x1 ^= x0
    return _pack_bits(x1), _pack_bits(x0)


async def and_recv(ch: Channel, receiver: IknpReceiver, b: np.ndarray) -> np.ndarray:
    """As the random-OT receiver with the bits of ``b`` ((n,) uint64) as choices: this party's
    XOR share of ``a_other & b``."""
    v = np.empty(64 * b.size, dtype=np.uint8)
    async for off, mc in receiver.random_chunks(ch, np.unpackbits(b.view(np.uint8), bitorder="little")):
        np.bitwise_and(mc.view(np.uint8)[:, 0], 1, out=v[off:off + len(mc)])
    return _pack_bits(v)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """(64 n,) 0/1 uint8 -> (n,) uint64, bit j of word i from bits[i*64 + j] (the inverse of
    ``np.unpackbits(w.view(np.uint8), bitorder="little")``)."""
    return np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64, copy=False)


def _u64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint64)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int64))


class Party:
    """One side of the joint triple generation: its own PRG, its IKNP sender and receiver."""

    def __init__(self, role: str):
        self.role = role
        self.prg = ring.MaskPRG()
        self.sender: IknpSender | None = None
        self.receiver: IknpReceiver | None = None

    async def setup(self, ch: Channel) -> None:
        # the client's extension as sender first, then the server's
        if self.role == "client":
            self.sender = await IknpSender.setup(ch)
            self.receiver = await IknpReceiver.setup(ch)
        else:
            self.receiver = await IknpReceiver.setup(ch)
            self.sender = await IknpSender.setup(ch)

    async def _both(self, ch, send_fn, recv_fn):
        """``(await send_fn(ch, sender), await recv_fn(ch, receiver))``: the client's extension as
        sender first on both sides, so the two extensions stay in step."""
        if self.role == "client":
            sent = await send_fn(ch, self.sender)
            return sent, await recv_fn(ch, self.receiver)
        got = await recv_fn(ch, self.receiver)
        return await send_fn(ch, self.sender), got

    async def _cross(self, ch, mine_u, mine_v, send_fn, recv_fn):
        """Both cross terms: as sender with u = a_self, as receiver with v = b_self."""
        sent, got = await self._both(ch, lambda ch_, s: send_fn(ch_, s, mine_u), lambda ch_, r: recv_fn(ch_, r, mine_v))
        return sent + got

    async def mul(self, ch: Channel, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = self.prg.ring(n), self.prg.ring(n)
        cross = await self._cross(ch, _u64(a), _u64(b), gilboa_send, gilboa_recv)
        return a, b, a * b + _t(cross)

    async def poly(self, ch: Channel, n: int, k: int, subsets) -> list[torch.Tensor]:
        """``k`` masks of ``n`` elements and this party's shares of their products over ``subsets``
        (:class:`beaver.Correlation`): each product of a shared prefix product (or mask) with one
        more mask by Gilboa, one batch per degree."""
        masks = [self.prg.ring(n) for _ in range(k)]
        prods: dict[tuple[int, ...], torch.Tensor] = {}
        for size in sorted({len(S) for S in subsets}):
            level = [S for S in subsets if len(S) == size]
            u = torch.cat([masks[S[0]] if size == 2 else prods[S[:-1]] for S in level])
            v = torch.cat([masks[S[-1]] for S in level])
            cross = _t(await self._cross(ch, _u64(u), _u64(v), gilboa_send, gilboa_recv))
            for S, c in zip(level, (u * v + cross).split(n)):
                prods[S] = c
        return masks + [prods[S] for S in subsets]

    async def and_(self, ch: Channel, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` words of AND bits: this party's XOR shares of a, b and c = a & b."""
        b = self.prg.ring(n)  # the choice bits of this party's random OTs as receiver
        (a, u), v = await self._both(ch, lambda ch_, s: and_send(ch_, s, n),
                                     lambda ch_, r: and_recv(ch_, r, _u64(b)))
        at = _t(a)
        return at, b, (at & b) ^ _t(u ^ v)

    async def matmul(self, ch: Channel, m: int, k: int, n: int):
        # Gilboa's vector form costs k n 64 OTs carrying m elements each (~ k n 64 (16 + 8 m) bytes
        # per cross term); the transposed triple (B^T, A^T, C^T) costs k m 64 (16 + 8 n). A decode
        # row (m = 1) against a long matrix is ~3x cheaper transposed (attention's q K^T and p V).
        if k * m * (16 + 8 * n) < k * n * (16 + 8 * m):
            Bt, At, Ct = await self._matmul(ch, n, k, m)
            return At.T.contiguous(), Bt.T.contiguous(), Ct.T.contiguous()
        return await self._matmul(ch, m, k, n)

    async def _matmul(self, ch: Channel, m: int, k: int, n: int):
        A, B = self.prg.ring(m, k), self.prg.ring(k, n)
        cross = await self._cross(
            ch, _u64(A), _u64(B),
            lambda ch_, s, u: gilboa_matmul_send(ch_, s, u.reshape(m, k), n),
            lambda ch_, r, v: gilboa_matmul_recv(ch_, r, v.reshape(k, n), m))
        return A, B, torch.matmul(A, B) + _t(cross)


def ot_provider(engine, what: str) -> "OTProvider":
    """The engine's OT provider, on whose IKNP extensions ``what`` runs (v3-ot's tables, comparisons
    and multiplexers; both parties in the same order, so no request message is needed)."""
    if not isinstance(engine.provider, OTProvider):
        raise ValueError(f"{what} run on the OT provider's IKNP extensions (--triples ot)")
    return engine.provider


def ring_words(t: torch.Tensor) -> np.ndarray:
    """A tensor of ring elements as a flat uint64 array (an OT step's input)."""
    return t.contiguous().numpy().view(np.uint64).reshape(-1)


def run_both(fn_client, fn_server):
    """Run the two parties' coroutines over an in-memory stream pair; return both results."""
    out = {}

    async def main():
        sa, sb = trio.testing.memory_stream_pair()
        ca, cb = Channel(sa), Channel(sb)

        async def a():
            out["c"] = await fn_client(ca)

        async def b():
            out["s"] = await fn_server(cb)

        await concurrently(a, b)
        out["channels"] = (ca, cb)

    trio.run(main)
    return out["c"], out["s"], out["channels"]


class OTProvider(beaver.PooledProvider):
    """Triples from joint OT generation (simulated parties). Elementwise triples come from a pool
    made in batches of ``batch`` elements, AND triples from one of ``batch`` 64-bit words (64
    bits each); matrix triples are made for each shape requested. ``prefill_and``: :meth:`prefill`
    makes the first AND pool too (for the secure comparisons), not only the elementwise one."""

    name = "ot"

    def __init__(self, batch: int = 1 << 14, prefill_and: bool = False):
        super().__init__(batch)
        if prefill_and:
            self.prefill_kinds = ("mul", "and")
        self.client, self.server = Party("client"), Party("server")
        self.ot_bytes = 0
        self._ready = False

    def _run(self, fc, fs):
        if not self._ready:
            async def cs(ch):
                await self.client.setup(ch)
                return await fc(ch)

            async def ss(ch):
                await self.server.setup(ch)
                return await fs(ch)
            self._ready = True
            c, s, chans = run_both(cs, ss)
        else:
            c, s, chans = run_both(fc, fs)
        self.ot_bytes += sum(ch.totals().bytes_sent for ch in chans)
        return c, s

    def _new_pool(self, n: int, kind="mul") -> list[torch.Tensor]:
        if isinstance(kind, tuple):  # ("poly", k, subsets)
            c, s = self._run(lambda ch: self.client.poly(ch, n, kind[1], kind[2]),
                             lambda ch: self.server.poly(ch, n, kind[1], kind[2]))
            return [t for pair in zip(c, s) for t in pair]
        fc, fs = (self.client.mul, self.server.mul) if kind == "mul" else (self.client.and_, self.server.and_)
        c, s = self._run(lambda ch: fc(ch, n), lambda ch: fs(ch, n))
        return [c[0], s[0], c[1], s[1], c[2], s[2]]

    def _make(self, kind, a_shape, b_shape) -> beaver.Triple | beaver.Correlation:
        if kind in ("mul", "and") or isinstance(kind, tuple):
            return self._pooled(kind, a_shape)
        *batch, m, k = a_shape
        n = b_shape[-1]
        parts = []
        for _ in range(int(np.prod(batch)) if batch else 1):
            parts.append(self._run(lambda ch: self.client.matmul(ch, m, k, n),
                                   lambda ch: self.server.matmul(ch, m, k, n)))
        def stack(side, i, shape):
            return torch.stack([p[side][i] for p in parts]).reshape(*batch, *shape)
        return beaver.Triple(next(self._serials), kind, (stack(0, 0, (m, k)), stack(1, 0, (m, k))),
                             (stack(0, 1, (k, n)), stack(1, 1, (k, n))), (stack(0, 2, (m, n)), stack(1, 2, (m, n))))


class NetOTProvider(OTProvider):
    """:class:`OTProvider` for one party of a networked session: the joint generation runs over
    the session channel, each party keeping only its own shares (the other slot is :data:`void.VOID`).

    ``run(afn)`` runs ``await afn(channel)`` on the channel from the engine (under ``sync_driver.drive``). Both
    parties' engines ask for the same triples in the same order (and agree on ``batch`` and
    ``prefill_and`` at set-up), so every pool refill and every matrix triple starts on both sides
    at the same point of the computation: no request message is needed.
    """

    def __init__(self, role: str, run, batch: int = 1 << 14, prefill_and: bool = False):
        super().__init__(batch, prefill_and)
        self.role = role
        self.client = self.server = Party(role)
        self._run_on_channel = run

    def _run(self, fc, fs):
        fn = fc if self.role == "client" else fs

        async def go(ch):
            if not self._ready:
                await self.client.setup(ch)
                self._ready = True
            return await fn(ch)

        mine = self._run_on_channel(go)
        blank = (VOID,) * len(mine)  # the other party's shares: no data here
        return (mine, blank) if self.role == "client" else (blank, mine)
