"""The ``ot`` protocol: a server session that runs batches of OTs, or embedding retrieval, with
the client.

Each client request is one message; the server runs the whole sub-protocol inside ``handle``:

- ``OT_REQ {role, kind, count, setup, seed, nbytes, reveal}``: ``role`` is the *server's* role
  (``sender`` or ``receiver``), ``kind`` one of random / correlated / chosen. ``setup`` asks for
  fresh base OTs in that direction (the first request of each direction must set up; later ones
  reuse the extension). The server's own inputs (correlations, messages, choice bits) are
  synthetic and public, drawn from ``seed`` with numpy's PCG64 so the client can check its
  outputs; the client's inputs are its own (fresh CSPRNG bytes by default) and stay private.
  These batches exist for benchmarks and interoperability tests. ``reveal`` (at most 2^20 OTs) makes the server
  send its outputs back in OT_DONE so a test can check them; it deliberately forfeits the
  privacy of that batch. Otherwise OT_DONE carries only the count and the server's time.
- ``OT_EMB_REQ``: embedding retrieval (embedding.serve_rows) from the server model's embedding
  table when it has one, else from a synthetic float32 table described in the request
  (``table: {rows, cols, seed}``), for tests and benchmarks.
"""

from __future__ import annotations

import time

import numpy as np

from ...party.channel import Channel
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from ...wire.schema import Bool, Int, Schema, Str
from . import embedding, prims
from .iknp import IknpReceiver, IknpSender

KINDS = ("random", "correlated", "chosen")
MAX_COUNT = 1 << 26
MAX_REVEAL = 1 << 20
MAX_NBYTES = 1 << 12


def _inputs(kind: str, role: str, count: int, nbytes: int, draw) -> dict:
    """A party's inputs for one batch from ``draw(n) -> n uint8``."""
    if role == "receiver":
        return {"choices": draw(count) & 1}
    if kind == "correlated":
        return {"delta": draw(8 * count).view(np.uint64)}
    if kind == "chosen":
        return {"msg0": draw(count * nbytes).reshape(count, nbytes),
                "msg1": draw(count * nbytes).reshape(count, nbytes)}
    return {}


def synthetic_inputs(kind: str, role: str, count: int, seed: int, nbytes: int = 16) -> dict:
    """The server's public, seeded inputs in the ``ot`` protocol (the client can recompute them)."""
    rng = np.random.default_rng([seed, 0 if role == "sender" else 1])
    return _inputs(kind, role, count, nbytes, lambda n: rng.integers(0, 256, n, dtype=np.uint8))


def fresh_inputs(kind: str, role: str, count: int, nbytes: int = 16) -> dict:
    """The client's inputs: fresh from the CSPRNG, so the server cannot know them."""
    return _inputs(kind, role, count, nbytes, prims.random_bytes)


def synthetic_table(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


async def run_sender(ch: Channel, ext: IknpSender, kind: str, count: int, inputs: dict, keep: bool) -> dict:
    """One batch as the OT sender. Returns the outputs when ``keep`` (else only streams)."""
    if kind == "random":
        if keep:
            m0, m1 = await ext.random(ch, count)
            return {"m0": m0, "m1": m1}
        async for _ in ext.random_chunks(ch, count):
            pass
        return {}
    if kind == "correlated":
        return {"x": await ext.correlated(ch, inputs["delta"])}
    await ext.chosen(ch, inputs["msg0"], inputs["msg1"])
    return {}


async def run_receiver(ch: Channel, ext: IknpReceiver, kind: str, choices, nbytes: int, keep: bool) -> dict:
    if kind == "random":
        if keep:
            return {"m": await ext.random(ch, choices)}
        async for _ in ext.random_chunks(ch, choices):
            pass
        return {}
    if kind == "correlated":
        return {"m": await ext.correlated(ch, choices)}
    return {"m": await ext.chosen(ch, choices, nbytes)}


OT_REQ = Schema("OT_REQ", role=Str(("sender", "receiver")), kind=Str(KINDS), count=Int(0, MAX_COUNT),
                seed=Int(0, 2**63, default=0), nbytes=Int(1, MAX_NBYTES, default=16), reveal=Bool(default=False),
                setup=Bool(default=False))


class OtHandler:
    message_types = frozenset({MsgType.OT_REQ, MsgType.OT_EMB_REQ})

    def __init__(self, session):
        self.session = session
        self.sender: IknpSender | None = None
        self.receiver: IknpReceiver | None = None

    async def handle(self, msg) -> None:
        ch = self.session.channel
        if msg.type == MsgType.OT_EMB_REQ:
            self.sender = await embedding.serve_rows(ch, self._table(msg.body), request=msg.body, sender=self.sender)
            return
        body = OT_REQ.check(msg.body)
        role, kind, count, seed, nbytes, reveal = (body[k] for k in ("role", "kind", "count", "seed", "nbytes", "reveal"))
        if reveal and count > MAX_REVEAL:
            raise ProtocolError(ErrorCode.MALFORMED, f"OT_REQ: reveal is limited to {MAX_REVEAL} OTs")
        t0 = time.perf_counter()
        if role == "sender":
            if body["setup"]:
                self.sender = await IknpSender.setup(ch)
            elif self.sender is None:
                raise ProtocolError(ErrorCode.WRONG_STATE, "OT_REQ: no OT extension as sender yet; send setup: true")
            inputs = synthetic_inputs(kind, role, count, seed, nbytes)
            out = await run_sender(ch, self.sender, kind, count, inputs, keep=reveal)
        else:
            if body["setup"]:
                self.receiver = await IknpReceiver.setup(ch)
            elif self.receiver is None:
                raise ProtocolError(ErrorCode.WRONG_STATE, "OT_REQ: no OT extension as receiver yet; send setup: true")
            inputs = synthetic_inputs(kind, role, count, seed, nbytes)
            out = await run_receiver(ch, self.receiver, kind, inputs["choices"], nbytes, keep=reveal)
        done = {"count": count, "seconds": time.perf_counter() - t0}
        if reveal:
            done["outputs"] = out
        await ch.send(MsgType.OT_DONE, done)

    def _table(self, body: dict) -> np.ndarray:
        model = self.session.server.model
        if model is not None and hasattr(model, "embedding_table"):
            return model.embedding_table()
        spec = embedding.OT_EMB_REQ.check(body)["table"]
        if spec is None:
            raise ProtocolError(ErrorCode.MALFORMED, "OT_EMB_REQ: this server has no model; describe a synthetic table")
        if spec["rows"] * spec["cols"] > 1 << 26:
            raise ProtocolError(ErrorCode.MALFORMED, "OT_EMB_REQ: synthetic table too large")
        return synthetic_table(spec["rows"], spec["cols"], spec["seed"])


class OtClient:
    """The client's side of an ``ot`` session: keeps one extension per direction."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.sender: IknpSender | None = None
        self.receiver: IknpReceiver | None = None

    async def batch(self, kind: str, count: int, *, server_role: str = "sender", seed: int = 0,
                    nbytes: int = 16, reveal: bool = False, inputs: dict | None = None, keep: bool = True) -> dict:
        """Run one batch; return {"mine": this side's outputs, "done": the server's OT_DONE body,
        "setup_seconds", "seconds"}. The client's inputs default to fresh CSPRNG bytes."""
        ch = self.channel
        my_role = "receiver" if server_role == "sender" else "sender"
        setup = (self.receiver if my_role == "receiver" else self.sender) is None
        await ch.send(MsgType.OT_REQ, {"role": server_role, "kind": kind, "count": count, "seed": seed,
                                       "nbytes": nbytes, "reveal": reveal, "setup": setup})
        if inputs is None:
            inputs = fresh_inputs(kind, my_role, count, nbytes)
        t0 = time.perf_counter()
        if my_role == "receiver":
            if setup:
                self.receiver = await IknpReceiver.setup(ch)
            t1 = time.perf_counter()
            with ch.phase(f"ot-{kind}"):
                mine = await run_receiver(ch, self.receiver, kind, inputs["choices"], nbytes, keep)
        else:
            if setup:
                self.sender = await IknpSender.setup(ch)
            t1 = time.perf_counter()
            with ch.phase(f"ot-{kind}"):
                mine = await run_sender(ch, self.sender, kind, count, inputs, keep)
        done = (await ch.expect(MsgType.OT_DONE)).body
        t2 = time.perf_counter()
        return {"mine": mine, "inputs": inputs, "done": done, "setup_seconds": t1 - t0, "seconds": t2 - t1}

    async def retrieve_rows(self, ids, table: dict | None = None) -> np.ndarray:
        """Embedding retrieval in this session (``table`` describes a synthetic one)."""
        ch = self.channel
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        body = {"count": int(ids.size), "setup": self.receiver is None}
        if table is not None:
            body["table"] = table
        await ch.send(MsgType.OT_EMB_REQ, body)
        rows, self.receiver = await embedding.receive_rows_after_request(ch, ids, self.receiver)
        return rows



def server_handler(spec, session) -> OtHandler:
    return OtHandler(session)
