"""``b x`` for a bit ``b = b_c XOR b_s`` (XOR-shared) and a value ``x = x_c + x_s`` (additively
shared) by two 1-of-2 OTs per element (CrypTFlow2's multiplexer, Rathee et al. CCS 2020) instead
of a Beaver product: v3-ot's ReLU, clip and comparisons' selections.

``b x = b x_c + b x_s``. For ``b x_c`` the client is the OT sender: it draws a fresh ``r_c``
(CSPRNG) and offers ``m_j = (b_c XOR j) x_c - r_c`` for j in {0, 1}; the server chooses
``j = b_s`` and obtains ``b x_c - r_c``; the client keeps ``r_c``. ``b x_s`` the same way with
the roles swapped. The client's output share is ``r_c + (b x_s - r_s)``, the server's
``(b x_c - r_c) + r_s``.

Privacy (semi-honest): each receiver sees one entry masked by a fresh uniform ``r`` (the other
under a pad it cannot compute, protocols/ot/nofn.py), each sender only IKNP's columns,
independent of the receiver's choice. Cost per element: one random OT (16 bytes of IKNP columns)
and two 8-byte entries each way, 32 bytes each way, against ~3 KB of OT traffic for a Beaver
triple made by Gilboa multiplication (beaver_ot.py). The two OTs run one after the other: three
flights (the server's columns; the client's entries and columns; the server's entries).

:func:`bit_product` is the other OT step v3-ot uses in place of a Beaver product: ``b_c b_s c``
for a bit only the client holds, a bit only the server holds and a public ring constant c (a
truncation's wrap bit ``msb_c msb_s``, engine.py; a comparison's XOR-to-additive step
``b_c b_s``, compare.py) by ONE correlated OT per element: the server is the sender with
``Δ = b_s c``, the client chooses ``b_c`` and gets ``x + b_c Δ``, the server keeps ``-x``.
24 bytes (16 of IKNP columns, 8 of correction) and one round trip, against a Gilboa-made
product's ~3 KB. The client's output is uniform (x is a fresh pad), the server sees only IKNP's
columns.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ot import nofn
from . import lut
from .beaver_ot import ot_provider, ring_words
from .shares import Shared
from .void import real


async def offer(ch, sender, x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sender's half of ``(b XOR b_other) x`` for its own ``x`` and bit ``b``: its output share."""
    r = lut.random_ring(x.size)
    m = np.stack([b * x - r, (1 - b) * x - r], axis=1)  # entry j = (b XOR j) x - r
    await nofn.send(ch, sender, m.view(np.uint8).reshape(x.size, 2, 8))
    return r


async def choose(ch, receiver, b: np.ndarray) -> np.ndarray:
    """The receiver's half: the entry at its own bit."""
    return (await nofn.receive(ch, receiver, b.astype(np.int64), 2, 8)).view(np.uint64).reshape(-1)


def on_shares(engine, x: Shared, bc: torch.Tensor, bs: torch.Tensor) -> Shared:
    """``(bc XOR bs) x`` as a :class:`Shared`, on the engine's OT provider (both parties' IKNP
    extensions, in the same order on both sides like lut.on_shares: no request message)."""
    p = ot_provider(engine, "the OT multiplexer's OTs")
    engine.stats.rounds += 2

    async def client(ch):
        bits = ring_words(bc) & np.uint64(1)
        r_c = await offer(ch, p.client.sender, ring_words(x.c), bits)
        got = await choose(ch, p.client.receiver, bits)
        return (torch.from_numpy((r_c + got).view(np.int64)).reshape(x.shape),)

    async def server(ch):
        bits = ring_words(bs) & np.uint64(1)
        got = await choose(ch, p.server.receiver, bits)
        r_s = await offer(ch, p.server.sender, ring_words(x.s), bits)
        return (torch.from_numpy((got + r_s).view(np.int64)).reshape(x.shape),)

    (c,), (s,) = p._run(client, server)
    return Shared(c, s)


def bit_product(engine, bc: torch.Tensor, bs: torch.Tensor, c) -> Shared:
    """``bc bs c`` as a :class:`Shared` (bc the client's 0/1 tensor, bs the server's, c a public
    int or int64 tensor broadcast to their shape) by one correlated OT per element."""
    p = ot_provider(engine, "the OT bit products")
    shape = real(bc, bs).shape
    engine.stats.rounds += 1

    async def client(ch):
        y = await p.client.receiver.correlated(ch, (ring_words(bc) & np.uint64(1)).astype(np.uint8))
        return (torch.from_numpy(y.view(np.int64)).reshape(shape),)

    async def server(ch):
        cs = torch.as_tensor(c, dtype=torch.int64).expand(shape)
        delta = (ring_words(bs) & np.uint64(1)) * ring_words(cs)
        x = await p.server.sender.correlated(ch, delta)
        return (torch.from_numpy((-x).view(np.int64)).reshape(shape),)

    (c_,), (s_,) = p._run(client, server)
    return Shared(c_, s_)
