"""v3-mpc over the wire: client and server each run one party of protocols/mpc/engine.py.

Each party runs the same :class:`MPCExecutor` code on its own share of every activation
(:class:`Engine` in party mode) under :func:`party.sync_driver.drive` (a greenlet on the
session's trio task); every point where the parties meet is a call into
:class:`ChannelTransport`, which hands the channel exchange to that task to await. The protocol
logic never touches I/O, so the same engine runs over an in-memory stream pair or TLS.

Session (all message types 0x12xx, every tensor int64 ring elements; anything else, a float
tensor or an extra field, is refused with ``malformed`` and the session closed):

- offline: ``MPC_SETUP {triples, ranges, batch[, seed]}`` -> ``MPC_SETUP_OK``, then each side
  makes its first pool of ``batch`` elementwise triples. With ``dealer`` the seed expands into
  the server's triple shares (:class:`beaver.SeededDealerProvider`: no messages); with ``ot``
  the two run base OTs and Gilboa multiplications over the channel (and, with the comparisons
  of the 'wide' ranges, random OTs for a first pool of ``batch`` words of AND triples). Once
  per session: a second set-up would restart the triple streams, so it is refused. The client's mask material
  (``r``, ``W r`` for every linear unit) is dealt locally, as for v3.
- per forward of T tokens: ``MPC_INPUT`` (enc(x) - r, T x d), then for each linear unit one
  ``MPC_RESHARE`` (x_c - r) and for each round of openings ``MPC_OPEN`` / ``MPC_OPEN_OK``
  (both flights at once; a re-share rides in the same flight as the next opening), and
  at the end ``MPC_REVEAL`` (the server's share of the logits, to the client only). ``ot``
  triples refill their pools and make matrix triples with OT messages (0x11xx) in between.

The client samples from the revealed logits; nothing else is ever revealed to either party.

``v3-ot`` is this protocol with :class:`approx_lut.LutEngine` on both sides: the same session,
with the triples always ``ot`` (nothing from a dealer) and exp, the softmax's reciprocal start,
the sigmoid and the GELU gate by table lookups (1-of-N OT messages, 0x11xx, between openings).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch
import trio

from ...party import sync_driver
from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from ...wire.schema import Int, Schema, Str, Tensor
from .. import preprocess
from ..units import FIXED_POINT, rows_needed, units_for
from . import beaver, beaver_ot
from .approx_lut import LutEngine
from .engine import Engine
from .executor import MPCExecutor, Ranges
from .weights import mpc_matrices

RANGES = {"wide": Ranges.wide, "narrow": Ranges}
# the engine of each protocol this module serves (v3-ot: table lookups, OT triples only)
ENGINES = {"v3-mpc": Engine, "v3-ot": LutEngine}
TRIPLES = ("dealer", "ot")
SEED_WORDS = 4  # the dealer's 32-byte seed as int64[4]: every tensor on the wire is a ring tensor
# elementwise triples per pool (the first dealt offline): dealing is cheap in bulk; an OT
# triple costs 128 correlated OTs, so its pool stays small
DEFAULT_BATCH = {"dealer": 1 << 21, "ot": 1 << 14}
MAX_BATCH = 1 << 22  # a pool costs the server 48 bytes per element: at most 192 MB per session
_TO_SERVER = {"input": MsgType.MPC_INPUT, "reshare": MsgType.MPC_RESHARE}


# The engine's messages each carry one tensor of ring elements, of the shape the schedule expects.
RING_MESSAGES = {t: Schema(t.name, **{field: Tensor("int64", "shape")}) for t, field in (
    (MsgType.MPC_OPEN, "v"), (MsgType.MPC_OPEN_OK, "v"), (MsgType.MPC_INPUT, "m"), (MsgType.MPC_RESHARE, "m"),
    (MsgType.MPC_REVEAL, "v"))}
MPC_SETUP = Schema("MPC_SETUP", triples=Str(TRIPLES), ranges=Str(tuple(RANGES)), batch=Int(1, MAX_BATCH),
                   seed=Tensor("int64", (SEED_WORDS,), default=None))


def ring_tensor(msg_type: MsgType, body, shape: tuple | None = None) -> torch.Tensor:
    """The ring tensor a ``msg_type`` body carries, of ``shape`` if given."""
    schema = RING_MESSAGES[msg_type]
    (field,) = schema.fields
    return torch.from_numpy(schema.check(body, shape=shape)[field].copy())


class ChannelTransport:
    """The engine's meeting points over a Channel, called from the engine running under
    :func:`sync_driver.drive`.

    One opening round is one flight each way, both at once (:meth:`Channel.exchange`): each party
    sends its shares of the whole round without waiting for the other's. Waiting for the peer's
    flight before sending would put two one-way trips on every round's critical path, not one.
    """

    def __init__(self, channel, role: str, idle_timeout: float = float("inf")):
        self.channel = channel
        self.role = role
        self.idle_timeout = idle_timeout  # the server's limit on each wait for the client
        self.pending: torch.Tensor | None = None  # the server's MPC_INPUT, already received by its loop
        self.wait_seconds = 0.0  # time blocked on the channel (the peer's compute, the network, hand-offs)

    def _call(self, afn, *args):
        t0 = time.perf_counter()
        try:
            return sync_driver.call(afn, *args)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def run(self, afn):
        """``await afn(channel)`` (a joint sub-protocol such as OT triple generation)."""
        return self._call(afn, self.channel)

    @staticmethod
    def offload(fn):
        """``fn()`` in a worker thread (heavy pure compute: the event loop keeps serving others)."""
        return sync_driver.call(trio.to_thread.run_sync, fn)

    def exchange(self, mine: torch.Tensor, theirs: int | None = None) -> torch.Tensor:
        """Send ``mine``, receive the peer's flight of ``theirs`` words (default: as many as mine)."""
        return self._call(self._exchange, mine, mine.numel() if theirs is None else theirs)

    async def _exchange(self, mine: torch.Tensor, theirs: int) -> torch.Tensor:
        send, recv = (MsgType.MPC_OPEN, MsgType.MPC_OPEN_OK) if self.role == "client" else \
            (MsgType.MPC_OPEN_OK, MsgType.MPC_OPEN)
        msg = await self.channel.exchange(send, {"v": mine.numpy()},
                                          lambda: self.channel.expect(recv) if self.role == "client" else self._expect(recv))
        return ring_tensor(recv, msg.body, (theirs,))

    def to_server(self, what: str, m: torch.Tensor) -> None:
        self._call(self.channel.send, _TO_SERVER[what], {"m": m.numpy()})

    def from_client(self, what: str, shape: tuple) -> torch.Tensor:
        if what == "input" and self.pending is not None:
            m, self.pending = self.pending, None
            if tuple(m.shape) != tuple(shape):
                raise ProtocolError(ErrorCode.MALFORMED, f"MPC_INPUT must have shape {tuple(shape)}")
            return m
        return self._call(self._recv_share, _TO_SERVER[what], shape)

    async def _recv_share(self, msg_type: MsgType, shape) -> torch.Tensor:
        return ring_tensor(msg_type, (await self._expect(msg_type)).body, shape)

    async def _expect(self, msg_type: MsgType):
        """The server's wait for the client inside a forward, under the session's idle timeout (the
        server loop's own timeout does not cover waits inside a handler)."""
        with trio.move_on_after(self.idle_timeout):
            return await self.channel.expect(msg_type)
        raise ProtocolError(ErrorCode.IDLE_TIMEOUT, f"no {msg_type.name} for {self.idle_timeout:g} s")

    def to_client(self, v: torch.Tensor) -> None:
        self._call(self.channel.send, MsgType.MPC_REVEAL, {"v": v.numpy()})

    def from_server(self, shape: tuple) -> torch.Tensor:
        return self._call(self._recv_reveal, shape)

    async def _recv_reveal(self, shape) -> torch.Tensor:
        return ring_tensor(MsgType.MPC_REVEAL, (await self.channel.expect(MsgType.MPC_REVEAL)).body, shape)


def make_provider(role: str, triples: str, transport: ChannelTransport, seed: bytes | None,
                  ranges: Ranges, batch: int) -> beaver.TripleProvider:
    if triples == "dealer":
        return beaver.SeededDealerProvider(role, seed, batch)
    if triples == "ot":  # with comparisons, the first pool of AND triples is made offline too
        return beaver_ot.NetOTProvider(role, transport.run, batch, prefill_and=ranges.comparisons)
    raise ValueError(f"triples must be one of {', '.join(TRIPLES)}, not {triples!r}")


# -- server --------------------------------------------------------------------------------------
class MPCServerHandler:
    """Per session: the server party. Accepts MPC_SETUP once, then one MPC_INPUT per forward."""

    message_types = frozenset({MsgType.MPC_SETUP, MsgType.MPC_INPUT})

    def __init__(self, session, protocol: str = "v3-mpc"):
        self.session = session
        self.protocol = protocol
        self.model = session.server.model
        self.executor: MPCExecutor | None = None
        self.transport = ChannelTransport(session.channel, "server", session.server.config.idle_timeout)

    async def handle(self, msg) -> None:
        if msg.type == MsgType.MPC_SETUP:
            await self._setup(msg.body)
            return
        if self.executor is None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "MPC_INPUT before MPC_SETUP")
        d = self.model.config.hidden
        m = ring_tensor(MsgType.MPC_INPUT, msg.body)
        if m.dim() != 2 or m.shape[1] != d or m.shape[0] < 1:
            raise ProtocolError(ErrorCode.MALFORMED, f"MPC_INPUT must be a (T, {d}) ring matrix, got {tuple(m.shape)}")
        if self.executor.length + m.shape[0] > self.session.max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"{self.executor.length + m.shape[0]} tokens exceed the "
                                                        f"session's max_seq_len of {self.session.max_seq_len}")
        self.transport.pending = m
        await sync_driver.drive(lambda: self.executor.forward(n_tokens=m.shape[0]))

    async def _setup(self, body: dict) -> None:
        if self.executor is not None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "MPC_SETUP twice: a session's triple streams start once "
                                                       "(Beaver triples are single-use)")
        body = MPC_SETUP.check(body)
        triples, ranges, batch, seed = body["triples"], RANGES[body["ranges"]](), body["batch"], body["seed"]
        if (seed is None) != (triples == "ot"):
            raise ProtocolError(ErrorCode.MALFORMED, "MPC_SETUP carries a seed with the dealer's triples and only then")
        if self.protocol == "v3-ot" and (triples != "ot" or not ranges.comparisons):
            raise ProtocolError(ErrorCode.MALFORMED, "v3-ot runs with OT triples and the 'wide' ranges only (no dealer)")
        if triples == "dealer":
            seed = seed.tobytes()
            # digests of the dealer seeds this server's sessions have used: a repeated seed would
            # replay the same triples (its openings would reveal differences of the client's values)
            seen = self.session.server.protocol_state("v3-mpc:seeds", set)
            digest = hashlib.sha256(seed).digest()
            if digest in seen:
                raise ProtocolError(ErrorCode.MALFORMED, "dealer seed already used in an earlier session: it would "
                                                         "replay the same Beaver triples (triples are single-use)")
            seen.add(digest)
        try:
            provider = make_provider("server", triples, self.transport, seed, ranges, batch)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.MALFORMED, str(exc)) from None
        engine = ENGINES[self.protocol](provider, transport=self.transport)
        # the ring weights are built once per process, off the event loop (seconds for SmolLM2),
        # by the server's preload when it offers the protocol (waited for, not built twice)
        await self.session.server.preloaded(self.protocol)
        self.executor = await trio.to_thread.run_sync(lambda: MPCExecutor(self.model, engine, ranges))
        await self.session.channel.send(MsgType.MPC_SETUP_OK, {})
        await sync_driver.drive(provider.prefill)  # the first pool (joint with the client for ot)


# -- client --------------------------------------------------------------------------------------
class MPCClient:
    """The client party: drives generation, samples from the revealed logits."""

    def __init__(self, channel, model, store: preprocess.MaterialStore, triples: str = "dealer",
                 mpc_ranges: str = "wide", triple_batch: int | None = None, protocol: str = "v3-mpc"):
        if protocol == "v3-ot" and (triples, mpc_ranges) != ("ot", "wide"):
            raise ValueError("v3-ot runs with OT triples and the 'wide' ranges only")
        if mpc_ranges not in RANGES:
            raise ValueError(f"mpc_ranges must be one of {', '.join(RANGES)}, not {mpc_ranges!r}")
        self.channel = channel
        self.triples, self.mpc_ranges = triples, mpc_ranges
        self.batch = triple_batch or DEFAULT_BATCH.get(triples, 1)
        self.transport = ChannelTransport(channel, "client")
        self.seed = os.urandom(8 * SEED_WORDS) if triples == "dealer" else None
        rng = RANGES[mpc_ranges]()
        self.provider = make_provider("client", triples, self.transport, self.seed, rng, self.batch)
        self.executor = MPCExecutor(model, ENGINES[protocol](self.provider, transport=self.transport), rng, store=store)
        self.timings: dict[str, float] = {}
        self.forwards: list[dict] = []
        self.offline_ms = 0.0
        self.notes = [f"{protocol}: triples by {'the client as trusted dealer' if triples == 'dealer' else 'IKNP OT'}, "
                      f"'{mpc_ranges}' ranges{' (secure comparisons)' if rng.comparisons else ''}"
                      + ("; exp, 1/x start, sigmoid, GELU by 1-of-N OT tables" if protocol == "v3-ot" else "")]

    async def setup(self) -> None:
        t0 = time.perf_counter()
        body = {"triples": self.triples, "ranges": self.mpc_ranges, "batch": self.batch}
        if self.seed is not None:
            body["seed"] = np.frombuffer(self.seed, dtype=np.int64).copy()
        await self.channel.request(MsgType.MPC_SETUP, body, MsgType.MPC_SETUP_OK)
        await sync_driver.drive(self.provider.prefill)  # dealt before the prompt is used
        self.offline_ms += (time.perf_counter() - t0) * 1e3

    def new_cache(self, capacity: int):
        if self.executor.length:
            raise RuntimeError("v3-mpc and v3-ot run one generation per session (the server's KV cache shares go on)")
        self.executor.new_cache(capacity)

    async def forward(self, ids: list[int]) -> torch.Tensor:
        before = self._counters()
        t0, w0 = time.perf_counter(), self.transport.wait_seconds
        logits = await sync_driver.drive(lambda: self.executor.forward(ids))
        after = self._counters()
        self.forwards.append({"tokens": len(ids), "seconds": time.perf_counter() - t0,
                              "wait_seconds": self.transport.wait_seconds - w0,
                              **{k: after[k] - before.get(k, 0) for k in after}})
        return logits[-1]

    def _counters(self) -> dict:
        p = self.provider
        e = self.executor.e
        party = getattr(p, "client", None)  # with OT: this party's two IKNP extensions
        ots = sum(x.count for x in (party.sender, party.receiver) if x is not None) if party is not None else 0
        return {**vars(e.stats), "ots": ots, "lookups": getattr(e, "lookups", 0), "lookup_bytes": getattr(e, "lookup_bytes", 0),
                **{f"triples_{k}": v for k, v in p.issued.items()},
                **{f"triple_elements_{k}": v for k, v in p.elements.items()}}

    @property
    def protocol_stats(self) -> dict:
        """Per forward: openings rounds and elements, triples (count and ring elements, by kind)."""
        return {"forwards": self.forwards}


def deal_for(model, prompt_tokens: int, max_tokens: int, progress=None) -> preprocess.MaterialStore:
    """The client's mask material for one generation of this shape."""
    return deal_rows(model, rows_needed(units_for(model.plan, "v3"), prompt_tokens, max_tokens), progress)


def deal_rows(model, rows: dict[str, int], progress=None) -> preprocess.MaterialStore:
    """Mask material (r, W r) for every linear unit, over v3-mpc's ring weights (:func:`mpc_matrices`)."""
    return preprocess.deal({name: W for name, (W, _k) in mpc_matrices(model).items()}, rows,
                           model_fingerprint=model.fingerprint(), variant="v3-mpc", fx=FIXED_POINT,
                           progress=progress)


def preload(spec, server, progress) -> dict:
    """party/spec's start-up hook: v3-mpc's ring weights (its own power-of-two encoding, not the
    masked protocols' matrices), with both kernels' weights, built in this worker thread (not
    cached on disk: README "Ready state")."""
    held = server.model.has_derived(("mpc", "matrices"))
    mats = mpc_matrices(server.model)
    for i, (W, _k) in enumerate(mats.values()):
        W.prepare()
        progress(i + 1, len(mats))
    return {"built": 0 if held else len(mats), "cache": False}


def matrices_built(spec, server) -> dict:
    total = len(units_for(server.model.plan, "v3"))
    return {"built": total if server.model.has_derived(("mpc", "matrices")) else 0, "total": total}


def server_handler(spec, session) -> MPCServerHandler:
    return MPCServerHandler(session, spec.name)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           material: str | None, triples: str, mpc_ranges: str, triple_batch: int | None) -> MPCClient:
    """The client with its mask material, loaded from a store or dealt now (the offline phase)."""
    t0 = time.perf_counter()
    if material:
        store = preprocess.MaterialStore.load(material)
        store.check_for(model.fingerprint(), "v3-mpc", FIXED_POINT)
    else:
        store = deal_for(model, prompt_tokens, max_tokens, progress=progress)
    c = MPCClient(channel, model, store, triples, mpc_ranges, triple_batch, spec.name)
    # a store was dealt ahead of time: this run's offline phase is 0, the store's time reported apart
    c.offline_ms = 0.0 if material else (time.perf_counter() - t0) * 1e3
    c.material_dealt_ms = store.meta["dealer_seconds"] * 1e3 if material else None
    return c


def deal(spec, model, tokens: int, progress=None) -> preprocess.MaterialStore:
    """``shardlm preprocess``: material for up to ``tokens`` positions, over v3-mpc's ring weights."""
    return deal_rows(model, {n: tokens for n in units_for(model.plan, "v3")}, progress)
