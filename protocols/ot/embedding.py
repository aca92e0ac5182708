"""Private embedding retrieval: the client gets table rows for its token ids by 1-of-V OT.

The server holds a (V, d) table (float32 for an embedding). Per request of T ids:

    client -> server   OT_EMB_REQ {count: T, setup}            (T is revealed, the ids never)
    [128 base OTs, once per session, if setup]
    server -> client   OT_EMB_TABLE {rows, cols, dtype}, then the table encrypted row by row:
                       E_x = row_x ⊕ G(key_x) under fresh random 128-bit row keys key_x
    1-of-V OT (nofn) of the 16-byte row keys, T instances with the client's ids as choices
    client             row_{id_t} = E_{id_t} ⊕ G(key_{id_t})

The server's view is the count T and T·ceil(log2 V) IKNP columns, which are independent of the
ids, so it learns nothing about which rows were taken. The client learns exactly T row keys,
so every other row stays encrypted under a pseudorandom pad.

Honest cost: the encrypted table travels whole on every request (V·d·4 bytes; 113 MB for
SmolLM2's 49152 x 576 float32 table) plus V·16 bytes of masked keys per token (786 KB) plus
ceil(log2 V)·16 bytes of IKNP per token. Batching T tokens into one request amortises the
table over them. This is more traffic than downloading the (open) table once: it exists for a
client that must not hold the table, not as a cheap path. ``cost_bytes`` computes the formula
that the tests check against the channel counters.
"""

from __future__ import annotations

import numpy as np

from ...party.channel import Channel
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from ...wire.schema import Bool, Int, Map, Schema
from . import nofn, prims
from .iknp import IknpReceiver, IknpSender

_TABLE_MESSAGE_BYTES = 8 << 20
_ROW_DOMAIN = 3


# A table described by the client, for a server without a model (the `ot` protocol's benchmarks).
SYNTHETIC_TABLE = Schema("OT_EMB_REQ table", rows=Int(1, 1 << 18), cols=Int(1, 1 << 14), seed=Int(0, 2**63, default=0))
OT_EMB_REQ = Schema("OT_EMB_REQ", count=Int(0, 1 << 20), setup=Bool(default=False),
                    table=Map(SYNTHETIC_TABLE, default=None))


def cost_bytes(V: int, d: int, count: int, itemsize: int = 4) -> dict:
    """Payload bytes of one request (frame headers and msgpack framing not included)."""
    k = nofn.bits_for(V)
    table = V * d * itemsize
    keys = count * V * 16
    iknp = -(-count * k // 128) * 128 * 16  # 16 bytes per 1-of-2 OT, padded to a multiple of 128
    return {"table": table, "keys": keys, "iknp": iknp, "total": table + keys + iknp,
            "per_token": (table + keys + iknp) / max(count, 1)}


async def serve_rows(channel: Channel, table: np.ndarray, *, request: dict | None = None,
                     sender: IknpSender | None = None) -> IknpSender:
    """Server side of one request; returns the IKNP sender (reuse it for the next request).

    ``request`` is the body of an OT_EMB_REQ already received (else one is awaited).
    """
    if request is None:
        request = (await channel.expect(MsgType.OT_EMB_REQ)).body
    request = OT_EMB_REQ.check(request)
    count = request["count"]
    if request["setup"] or sender is None:
        if not request["setup"]:
            raise ProtocolError(ErrorCode.WRONG_STATE, "OT_EMB_REQ without setup, but no OT extension is set up yet")
        sender = await IknpSender.setup(channel)
    table = np.ascontiguousarray(table)
    V, d = table.shape
    raw = table.reshape(V, -1).view(np.uint8)
    row_bytes = raw.shape[1]
    row_keys = prims.random_bytes(V * 16).view(np.uint64).reshape(V, 2)
    with channel.phase("emb-table"):
        await channel.send(MsgType.OT_EMB_TABLE, {"rows": V, "cols": d, "dtype": table.dtype.name})
        step = max(1, _TABLE_MESSAGE_BYTES // max(row_bytes, 1))
        for off in range(0, V, step):
            sl = slice(off, min(V, off + step))
            ct = raw[sl] ^ prims.expand(row_keys[sl], row_bytes, _ROW_DOMAIN)
            await channel.send(MsgType.OT_EMB_TABLE, {"ct": ct})
    with channel.phase("emb-keys"):
        await nofn.send(channel, sender, row_keys.view(np.uint8).reshape(V, 16), count=count)
    return sender


async def retrieve_rows(channel: Channel, ids, *, receiver: IknpReceiver | None = None,
                        return_receiver: bool = False):
    """Client side: the table rows for ``ids`` (in order, repeats allowed), as the server's
    dtype, shape (len(ids), d). Pass ``receiver`` to reuse an IKNP set-up from a previous call."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    await channel.send(MsgType.OT_EMB_REQ, {"count": int(ids.size), "setup": receiver is None})
    rows, receiver = await receive_rows_after_request(channel, ids, receiver)
    return (rows, receiver) if return_receiver else rows


async def receive_rows_after_request(channel: Channel, ids: np.ndarray, receiver: IknpReceiver | None):
    """The client's part after its OT_EMB_REQ (whose ``setup`` was ``receiver is None``)."""
    if receiver is None:
        receiver = await IknpReceiver.setup(channel)
    with channel.phase("emb-table"):
        head = (await channel.expect(MsgType.OT_EMB_TABLE)).body
        V, d, dtype = head.get("rows"), head.get("cols"), head.get("dtype")
        if not (isinstance(V, int) and isinstance(d, int) and V > 0 and d >= 0) or dtype not in ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "uint64"):
            raise ProtocolError(ErrorCode.MALFORMED, f"OT_EMB_TABLE: bad header {head}")
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"token ids must lie in [0, {V})")
        row_bytes = d * np.dtype(dtype).itemsize
        mine = np.empty((ids.size, row_bytes), dtype=np.uint8)
        got = 0
        while got < V:
            ct = (await channel.expect(MsgType.OT_EMB_TABLE)).body.get("ct")
            if not isinstance(ct, np.ndarray) or ct.dtype != np.uint8 or ct.ndim != 2 or ct.shape[1] != row_bytes \
                    or not 0 < len(ct) <= V - got:
                raise ProtocolError(ErrorCode.MALFORMED, "OT_EMB_TABLE: bad ciphertext block")
            hit = (ids >= got) & (ids < got + len(ct))
            mine[hit] = ct[ids[hit] - got]
            got += len(ct)
    with channel.phase("emb-keys"):
        keys = await nofn.receive(channel, receiver, ids, V, 16)
    mine ^= prims.expand(keys.view(np.uint64).reshape(-1, 2), row_bytes, _ROW_DOMAIN)
    rows = mine.view(np.dtype(dtype).newbyteorder("<")).reshape(ids.size, d).astype(dtype)
    return rows, receiver
