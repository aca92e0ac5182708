"""v2 and v3: the server does every linear layer on one-time-padded ring inputs.

Client, per linear step of the plan: encode the input rows ``x`` in fixed point, take fresh
mask rows ``r`` and their product ``W r`` from the preprocessed material, send ``m = x - r``
(uniform in Z_2^64, so it says nothing about ``x``), receive ``W m`` computed exactly mod
2^64, and recover ``W x = W m + W r``. Biases, norms, RoPE, attention over the client's own
KV cache, activations and residuals run on the client in the clear. The server's view is a
unit name (public: the same schedule for every prompt) and uniform ring tensors.

- ``v2`` (the seeds' V2): one round per linear op, 7L+1 rounds per token for a SwiGLU model.
- ``v3``: ops sharing an input are one fused unit (q/k/v, gate/up), the whole prompt goes in
  one batch, weights stay resident on the server's device as int8 digit matrices (ring.py):
  4L+1 rounds per token.
- ``v3-2r``: v3 with each residual projection precomposed with the next norm and projection
  (models/plan.Composite: o with gate/up, down with the next layer's q/k/v). The client sends
  ``[a | res]`` masked; the server returns ``first(a)``, ``(T first) a`` and ``T res``; the
  client adds the residual, takes the norm's row statistics and finishes. 2L+2 rounds per token
  (layer 0's q/k/v, 2L-1 composites, the last down, the head) for ~1.9x the weights the server
  streams per token, and the composed matrices are exact integer products (ring.compose), so
  server and dealer agree bit for bit. It trades server time for round trips (README has the
  measured trade-off).

What it does not hide: the number of tokens processed per round (prompt length, then one per
decode step), timing, and that generation is happening. The server's replies are trusted unless
the client runs with ``verify`` (``--verify``): then each is checked (protocols/verify.py) and the
first altered product aborts the session.
"""

from __future__ import annotations

import time

import torch
import trio

from ..models.config import ModelError
from ..models.executor import forward_steps, run_async
from ..party.generation import PREFILL_CHUNK
from ..models.reference import Reference
from ..models.plan import Composite, Linear
from ..wire.msgtypes import MsgType
from ..wire.schema import Schema, Str, Tensor
from . import preprocess, ring
from .ot import embedding
from .units import FIXED_POINT, FUSED, PRECOMPOSED, encoding_for, matrices_for, rows_needed, units_for
from .verify import VerificationError, Verifier


def _deal(model, variant: str, rows: dict[str, int], progress=None) -> preprocess.MaterialStore:
    return preprocess.deal(matrices_for(model, variant), rows, model_fingerprint=model.fingerprint(),
                           variant=variant, fx=FIXED_POINT, progress=progress)


def deal_for(model, variant: str, prompt_tokens: int, max_tokens: int, progress=None) -> preprocess.MaterialStore:
    """The client's dealer: material for generations of up to this shape."""
    return _deal(model, variant, rows_needed(units_for(model.plan, variant), prompt_tokens, max_tokens), progress)


def deal_chunk(model, variant: str, positions: int) -> preprocess.MaterialStore:
    """Material for one later prefill chunk (its rows of every body unit, one head row), made
    when the chunk runs, so the client never holds a long prompt's material at once."""
    return _deal(model, variant, {name: 1 if u.head else positions for name, u in units_for(model.plan, variant).items()})


# -- server --------------------------------------------------------------------------------------
def _server_matrices(model, variant: str, device) -> dict:
    """The variant's matrices with the decode kernel's packed weights made too (both once per
    process), so the first decode step does not stall the event loop."""
    matrices = matrices_for(model, variant, device)
    for W in matrices.values():
        W.pack()
    return matrices


MASKED_LINEAR = Schema("MASKED_LINEAR", unit=Str(choices="units"), m=Tensor("int64", ("rows", "in_dim"), rows=0))
MASKED_LINEAR_OK = Schema("MASKED_LINEAR_OK", y=Tensor("int64", ("rows", "out_dim")))


# Rows per product call: bounds a request's transient working memory (the int8 digit GEMMs'
# temporaries grow with rows x out_dim), and a TTL cancel takes effect between calls.
CHUNK_ROWS = 64


class MaskedServerHandler:
    """Per session: answers MASKED_LINEAR with ``W m mod 2^64``. Accepts nothing but ring tensors.

    Rows are charged against the session's capacity per unit, as the schedule uses them: a
    body unit sees each position once (prompt rows, then one per decode step), the LM head
    one row per forward; so no session can ask for more products than a generation of its
    declared length needs."""

    message_types = frozenset({MsgType.MASKED_LINEAR, MsgType.OT_EMB_REQ})

    def __init__(self, session, variant: str):
        self.session = session
        self.variant = variant
        self.units = units_for(session.server.model.plan, variant)
        self.matrices = None  # built (once per process) on first use, off the event loop
        self.ot_sender = None

    async def handle(self, msg) -> None:
        server = self.session.server
        if msg.type == MsgType.OT_EMB_REQ:  # --embedding ot: rows by 1-of-V OT, ids never sent
            request = embedding.OT_EMB_REQ.check(msg.body)
            self.session.charge("embedding rows", request["count"])
            # the body as received: serve_rows checks it itself (a checked body, with its default
            # `table: None` filled in, is not a valid request)
            self.ot_sender = await embedding.serve_rows(self.session.channel, server.model.embedding_table(),
                                                        request=msg.body, sender=self.ot_sender)
            return
        if self.matrices is None:  # seconds for a large model: other sessions keep being served
            self.matrices = await trio.to_thread.run_sync(_server_matrices, server.model, self.variant,
                                                          server.config.device)
        body = MASKED_LINEAR.check(msg.body, units=self.matrices, in_dim=lambda f: self.matrices[f["unit"]].in_dim,
                                   rows=(1, self.session.max_seq_len))
        unit, m = self.units[body["unit"]], torch.from_numpy(body["m"])
        self.session.charge(unit.name, m.shape[0], per_request=1 if unit.head else None)
        W = self.matrices[unit.name]
        self.session.check_memory(m.shape[0] * (W.in_dim + 2 * W.out_dim) * 8, f"{m.shape[0]} rows of {unit.name}")
        y = torch.empty((m.shape[0], W.out_dim), dtype=torch.int64)
        for at in range(0, m.shape[0], CHUNK_ROWS):
            y[at:at + CHUNK_ROWS] = await server.compute(W.matmul, m[at:at + CHUNK_ROWS])
        await self.session.channel.send(MsgType.MASKED_LINEAR_OK, {"y": y.numpy()})


# -- client --------------------------------------------------------------------------------------
class MaskedClient:
    """The client side of a v2/v3 session: drives the plan, offloading each linear unit."""

    def __init__(self, channel, model, variant: str, store: preprocess.MaterialStore,
                 fx: ring.FixedPoint = FIXED_POINT, embedding_source: str = "local", verify: bool = False,
                 streamed: range = range(0)):
        """``streamed``: the prompt positions whose material is not in ``store`` but dealt chunk
        by chunk as the prefill reaches them (deal_chunk); their dealing time adds to offline_ms."""
        store.check_for(model.fingerprint(), variant, fx)
        self.channel = channel
        self.model = model
        self.variant = variant
        self.store = store
        self.material = store  # where linear() takes rows: the store, or a streamed chunk's material
        self.streamed = streamed
        self.offline_ms = 0.0
        self.fx = fx
        self.units = units_for(model.plan, variant)
        self.unit_of = {u.ops[0].name: u for u in self.units.values()}
        self.encoding = encoding_for(model, variant)
        if embedding_source not in ("local", "ot"):
            raise ValueError(f"embedding source must be 'local' or 'ot', not {embedding_source!r}")
        self.embedding_source = embedding_source
        self.ot_receiver = None
        self.ref = Reference.of(model)  # for its KV cache and RoPE tables
        self.cache = None
        self.timings: dict[str, float] = {}
        # the check's secret keys for every unit, drawn now (offline work: U W needs no prompt)
        self.verifier = Verifier(matrices_for(model, variant)) if verify else None

    @property
    def verification(self) -> dict | None:
        """What ``verify`` checked and what it cost (None without it)."""
        return self.verifier.stats() if self.verifier is not None else None

    def new_cache(self, capacity: int):
        self.cache = self.ref.new_cache(capacity)
        return self.cache

    async def linear(self, ops: tuple[Linear, ...] | Composite, x) -> list[torch.Tensor]:
        comp = ops if isinstance(ops, Composite) else None
        unit = self.unit_of[comp.first.name if comp else ops[0].name]
        assert unit.composite == comp and (comp or unit.ops == ops), "the executor's grouping and the unit table disagree"
        parts = self.encoding[unit.name]
        if comp is None:
            bits = [self.fx.bits_for(float(x.abs().max()), parts[0][1])]
            encoded = self.fx.encode(x, bits[0])
        else:  # input [a | res]: a meets the first and the cross products, res the T product
            a, res = x
            bits_a = min(self.fx.bits_for(float(a.abs().max()), l1) for _, l1 in parts[:2])
            bits = [bits_a, bits_a, self.fx.bits_for(float(res.abs().max()), parts[2][1])]
            encoded = torch.cat([self.fx.encode(a, bits_a), self.fx.encode(res, bits[2])], dim=1)
        n = encoded.shape[0]
        r, wr = self.material.take(unit.name, n)
        m = encoded - r
        t0 = time.perf_counter()
        reply = await self.channel.request(MsgType.MASKED_LINEAR, {"unit": unit.name, "m": m.numpy()},
                                           MsgType.MASKED_LINEAR_OK)
        self.timings["wait"] = self.timings.get("wait", 0.0) + time.perf_counter() - t0
        y = torch.from_numpy(MASKED_LINEAR_OK.check(reply, rows=n, out_dim=unit.out_dim)["y"])
        z = y + wr  # W x
        if self.verifier is not None:
            try:
                self.verifier.check(unit.name, m, y, z)
            except VerificationError as exc:  # nothing of this reply is used; the server is told why
                await self.channel.send_error(exc.code, exc.message)
                raise
        decoded, at = [], 0
        for b, (scales, _) in zip(bits, parts):
            decoded.append(self.fx.decode_product(z[:, at:at + scales.numel()], b, scales))
            at += scales.numel()
        w = self.model.weights
        if comp is not None:  # first(a) with its bias; per `then` op T (res + first(a)), the executor finishes
            first = decoded[0] + w[comp.first.bias] if comp.first.bias else decoded[0]
            return [first, *torch.split(decoded[2] + decoded[1], [op.out_dim for op in comp.then], dim=1)]
        outs = torch.split(decoded[0], [op.out_dim for op in ops], dim=1)
        return [part + w[op.bias] if op.bias else part for op, part in zip(ops, outs)]

    async def forward(self, ids: list[int]) -> torch.Tensor:
        if self.cache.length in self.streamed:  # a later chunk of a long prompt: its material now
            t0 = time.perf_counter()
            self.material = deal_chunk(self.model, self.variant, len(ids))
            self.offline_ms += (time.perf_counter() - t0) * 1e3
        try:
            return await self._forward(ids)
        finally:
            self.material = self.store

    async def _forward(self, ids: list[int]) -> torch.Tensor:
        embedded = None
        if self.embedding_source == "ot":
            t0 = time.perf_counter()
            with self.channel.phase("embedding-ot"):
                rows, self.ot_receiver = await embedding.retrieve_rows(self.channel, ids, receiver=self.ot_receiver,
                                                                       return_receiver=True)
            embedded = torch.from_numpy(rows)
            self.timings["embed"] = self.timings.get("embed", 0.0) + time.perf_counter() - t0
        gen = forward_steps(self.model.plan, self.model.weights, torch.tensor(ids, dtype=torch.long), self.cache,
                            self.ref.rope, fuse=FUSED[self.variant], timings=self.timings, embedded=embedded,
                            precompose=self.variant in PRECOMPOSED)
        return (await run_async(gen, self.linear))[-1]


def server_handler(spec, session) -> MaskedServerHandler:
    return MaskedServerHandler(session, spec.name)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           embedding_source: str, material: str | None, verify: bool) -> MaskedClient:
    """Online client with its material: loaded from a store (made ahead of time: offline_ms 0,
    the store's own dealing time reported as material_dealt_ms), or dealt now (the offline phase:
    the first prefill chunk and every decode step; a long prompt's later chunks are dealt as the
    prefill reaches them, so the material held at once follows the chunk, not the prompt).
    ``verify``: check every reply (protocols/verify.py); its keys count as offline time."""
    if verify and model.client_only:  # refused before any material is claimed
        raise ModelError(f"--verify checks replies against U W, which needs the linear weight matrices; {model.source} "
                         f"is an export-client directory without them: run without --verify, or from the full model")
    t0 = time.perf_counter()
    if material:
        store = preprocess.MaterialStore.load(material)
        c = MaskedClient(channel, model, spec.name, store, embedding_source=embedding_source, verify=verify)
        c.material_dealt_ms = store.meta["dealer_seconds"] * 1e3
        c.offline_ms = (c.verifier.setup_seconds if c.verifier is not None else 0.0) * 1e3
        return c
    first = min(prompt_tokens, PREFILL_CHUNK)  # the first prefill forward's positions
    store = deal_for(model, spec.name, first, max_tokens, progress=progress)
    c = MaskedClient(channel, model, spec.name, store, embedding_source=embedding_source, verify=verify,
                     streamed=range(first, prompt_tokens))
    c.offline_ms = (time.perf_counter() - t0) * 1e3
    return c


def deal(spec, model, tokens: int, progress=None) -> preprocess.MaterialStore:
    """``shardlm preprocess``: material for one generation of up to ``tokens`` positions, whatever
    the prompt/generation split (prompt 1 needs the most head rows, prompt tokens-1 the most body rows)."""
    return _deal(model, spec.name, {n: tokens for n in units_for(model.plan, spec.name)}, progress)
