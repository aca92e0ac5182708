"""v2 and v3: the server does every linear layer on one-time-padded ring inputs.

Client, per linear step of the plan: encode the input rows ``x`` in fixed point, take fresh
mask rows ``r`` and their product ``W r`` from the preprocessed material, send ``m = x - r``
(uniform in Z_2^64, so it says nothing about ``x``), receive ``W m`` computed exactly mod
2^64 (by default only the low bits that the unit's public bound needs: protocols/lowbits.py),
and recover ``W x = W m + W r``. Biases, norms, RoPE, attention over the client's own
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
decode step, or K+1 with ``--draft``: party/speculative), the number of decode forwards (with
drafts: how predictable the text was, unless ``--pad-to-max``), timing, and that generation is
happening. The server's replies are trusted unless
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
from ..party.client import connect
from ..party.handshake import capacity_bucket
from ..party.drafting import MAX_DRAFT_LEN, Drafting
from ..party.spec import OptionError
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from ..wire.tls import peer_fingerprint
from ..wire.schema import Int, Schema, Str, Tensor
from . import lowbits, matrix_cache, offline, preprocess, ring, units
from .he import bfv
from .he import service as he
from .ot import embedding
from .units import (FIXED_POINT, FUSED, PRECOMPOSED, block_matrices, blocks, encoding_for, matrices_for, matrix_for,
                    matrix_key, rows_needed, units_for)
from .verify import VerificationError, Verifier


def deal_for(model, variant: str, prompt_tokens: int, max_tokens: int, progress=None) -> preprocess.MaterialStore:
    """The client's own dealing (``--offline client``): material for generations of up to this shape."""
    return offline.deal_locally(model, variant, rows_needed(units_for(model.plan, variant), prompt_tokens, max_tokens),
                                progress)


def chunk_rows(model, variant: str, positions: int) -> dict[str, int]:
    """The rows of one later prefill chunk (every body unit's positions, one head row): dealt when
    the chunk runs, so the client never holds a long prompt's material at once."""
    return {name: 1 if u.head else positions for name, u in units_for(model.plan, variant).items()}


# -- server --------------------------------------------------------------------------------------
def _server_matrices(server, variant: str, progress=None) -> dict:
    """The variant's matrices (from the server's disk cache when it holds them) with both
    kernels' weights made too (ring.RingMatrix.prepare), once per process, so neither the first
    decode step nor the first prefill stalls for them. ``progress(done, total)`` after each unit.
    With ``serve --tp`` the units are sharded across the ranks (protocols/tp: every rank builds
    its rows now)."""
    if getattr(server, "tp", None) is not None:
        return server.tp.matrices(variant, progress)
    cache = matrix_cache.for_server(server)
    units = units_for(server.model.plan, variant)
    out = {}
    for i, (name, u) in enumerate(units.items()):
        out[name] = matrix_for(server.model, u, server.config.device, cache)
        out[name].prepare()
        if progress is not None:
            progress(i + 1, len(units))
    return out


def preload(spec, server, progress) -> dict:
    """party/spec's start-up hook: build (or load) ``spec``'s matrices in this worker thread; what
    the cache did for them (loaded / built / rejected matrices) goes to health and the ready event."""
    if getattr(server, "tp", None) is not None:  # shards are built from the weights on every rank, not cached
        _server_matrices(server, spec.name, progress)
        return {"loaded": 0, "built": len(units_for(server.model.plan, spec.name)), "rejected": 0, "cache": False}
    cache = matrix_cache.for_server(server)
    held = matrices_built(spec, server)
    before = dict(cache.stats) if cache else {}
    _server_matrices(server, spec.name, progress)
    after = cache.stats if cache else {"built": held["total"] - held["built"]}  # what it did not hold before
    mem = units.resident(server.model, [spec.name], server.config.device)["protocols"].get(spec.name, {})
    return ({k: after.get(k, 0) - before.get(k, 0) for k in ("loaded", "built", "rejected")}
            | {"cache": cache is not None, "resident_bytes": mem.get("bytes", 0),
               "bytes_per_weight": mem.get("bytes_per_weight")})


def matrices_built(spec, server) -> dict:
    """How many of ``spec``'s unit matrices this process holds (info and health)."""
    model, device = server.model, str(server.config.device)
    units = units_for(model.plan, spec.name)
    if getattr(server, "tp", None) is not None:
        return {"built": len(units) if spec.name in server.tp.shapes else 0, "total": len(units)}
    built = sum(model.has_derived((*matrix_key(u), device)) for u in units.values())
    return {"built": built, "total": len(units)}


# ``bits``/``shift``: the reply's window (protocols/lowbits.py), bits shift..shift+bits-1 of each product;
# whatever the client asks, the reply is at most the 8 bytes per product of the full one.
MASKED_LINEAR = Schema("MASKED_LINEAR", unit=Str(choices="units"), m=Tensor("int64", ("rows", "in_dim"), rows=0),
                       bits=Int(1, lowbits.RING_BITS, default=lowbits.RING_BITS),
                       shift=Int(0, "max_shift", default=0))
MASKED_LINEAR_OK = Schema("MASKED_LINEAR_OK", y=Tensor("uint8", ("rows", "row_bytes")))


# Rows per product call: bounds a request's transient working memory (the int8 digit GEMMs'
# temporaries grow with rows x out_dim), and a TTL cancel takes effect between calls.
CHUNK_ROWS = 64


class MaskedServerHandler:
    """Per session: answers MASKED_LINEAR with ``W m mod 2^64``. Accepts nothing but ring tensors.

    Rows are charged against the session's capacity per unit, as the schedule uses them: a
    body unit sees each position once (prompt rows, then one per decode step, or K+1 per
    decode forward with K drafts: party/speculative), the LM head one row per prefill forward
    and at most MAX_DRAFT_LEN + 1 per decode forward; so no session can ask for more products
    than a generation of its declared capacity (HELLO's bucket, made from
    speculative.session_rows) needs."""

    message_types = frozenset({MsgType.MASKED_LINEAR, MsgType.OT_EMB_REQ, MsgType.HE_SETUP, MsgType.HE_PRODUCT})

    def __init__(self, session, variant: str):
        self.session = session
        self.variant = variant
        self.units = units_for(session.server.model.plan, variant)
        self.order = {name: i for i, name in enumerate(self.units)}  # the schedule's order, for batching
        self.matrices = None  # built (once per process) on first use, off the event loop
        self.ot_sender = None
        self.he_ready = False  # --offline he: after HE_SETUP agreed on the parameters

    async def handle(self, msg) -> None:
        server = self.session.server
        if msg.type in (MsgType.HE_SETUP, MsgType.HE_PRODUCT):
            await self._handle_he(msg)
            return
        if msg.type == MsgType.OT_EMB_REQ:  # --embedding ot: rows by 1-of-V OT, ids never sent
            request = embedding.OT_EMB_REQ.check(msg.body)
            self.session.charge("embedding rows", request["count"])
            # the body as received: serve_rows checks it itself (a checked body, with its default
            # `table: None` filled in, is not a valid request)
            self.ot_sender = await embedding.serve_rows(self.session.channel, server.model.embedding_table(),
                                                        request=msg.body, sender=self.ot_sender)
            return
        if self.matrices is None:  # seconds for a large model: other sessions keep being served
            # a protocol the server is preloading: wait for it (README "Ready state") rather than
            # build the same matrices a second time in parallel; then they are all made already
            await server.preloaded(self.variant)
            self.matrices = await trio.to_thread.run_sync(_server_matrices, server, self.variant)
        body = MASKED_LINEAR.check(msg.body, units=self.matrices, in_dim=lambda f: self.matrices[f["unit"]].in_dim,
                                   rows=(1, self.session.max_seq_len), max_shift=lambda f: lowbits.RING_BITS - f["bits"])
        unit, m = self.units[body["unit"]], torch.from_numpy(body["m"])
        self.session.charge(unit.name, m.shape[0], per_request=MAX_DRAFT_LEN + 1 if unit.head else None)
        W = self.matrices[unit.name]
        self.session.check_memory(m.shape[0] * (W.in_dim + 2 * W.out_dim) * 8, f"{m.shape[0]} rows of {unit.name}")
        y = torch.empty((m.shape[0], W.out_dim), dtype=torch.int64)
        for at in range(0, m.shape[0], CHUNK_ROWS):
            # exact mod 2^64 row by row: other sessions' rows of this matrix may share the product
            y[at:at + CHUNK_ROWS] = await server.batched(self.session, W, W.matmul, m[at:at + CHUNK_ROWS],
                                                         self.order[unit.name])
        await self.session.channel.send(MsgType.MASKED_LINEAR_OK, {"y": lowbits.pack(y, body["bits"], body["shift"])})


    async def _handle_he(self, msg) -> None:
        """``--offline he``: products of the client's encrypted masks (protocols/he/service.py),
        in a worker thread; one request at a time per session (the session's loop awaits it),
        its rows charged to the session's capacity per unit block like online rows."""
        server = self.session.server
        if msg.type == MsgType.HE_SETUP:
            params = he.HE_SETUP.check(msg.body)["params"]
            if params != bfv.parameters():
                raise ProtocolError(ErrorCode.MALFORMED, f"HE parameters differ from this server's: BFV with N={bfv.N}, "
                                                         f"t=2^{bfv.LOG_T}, q of {'+'.join(map(str, bfv.COEFF_BITS))} bits")
            self.he_ready = True
            await self.session.channel.send(MsgType.HE_SETUP_OK, {})
            return
        if not self.he_ready:
            raise ProtocolError(ErrorCode.WRONG_STATE, "HE_PRODUCT before HE_SETUP")
        pre = he.HE_PRODUCT.check(msg.body, units=self.units, cts=None, ct_bytes=None)
        unit = self.units[pre["unit"]]
        if pre["block"] >= len(blocks(unit)):
            raise ProtocolError(ErrorCode.MALFORMED, f"{unit.name} has {len(blocks(unit))} blocks, not block {pre['block']}")
        _, ni, _, no = blocks(unit)[pre["block"]]
        self.session.charge(f"he {unit.name}#{pre['block']}", pre["rows"])
        p = he.packing_for(ni, no, pre["rows"])
        body = he.HE_PRODUCT.check(msg.body, units=self.units, cts=p.cts_up, ct_bytes=bfv.CIPHERTEXT_BYTES)
        self.session.check_memory((p.cts_up + 2 * p.cts_down) * bfv.CIPHERTEXT_BYTES,
                                  f"{pre['rows']} HE rows of {unit.name}")
        block = await trio.to_thread.run_sync(self._he_block, unit.name, pre["block"])
        try:
            out, cpu_us = await server.compute(he.server_products, block, pre["rows"], body["cts"])
        except bfv.HEError as exc:
            raise ProtocolError(ErrorCode.MALFORMED, str(exc)) from None
        await self.session.channel.send(MsgType.HE_PRODUCT_OK, {"cts": out, "cpu_us": cpu_us})

    def _he_block(self, name: str, index: int) -> he.Block:
        """A unit block's integer weights for HE products, made once per process (4 bytes per weight)."""
        model = self.session.server.model

        def make():
            W = block_matrices(matrices_for(model, self.variant)[name])[index]
            i0, _, o0, _ = blocks(self.units[name])[index]
            block = he.Block(i0, o0, W.int_weights().numpy())
            he_cache(model)[(self.variant, name, index)] = block.ints.nbytes
            return block
        return model.derived(("he", self.variant, name, index), make)


def he_cache(model) -> dict:
    """Bytes of the HE weight encodings this process has built, per (variant, unit, block)."""
    return model.derived(("he", "bytes"), dict)


def server_info(spec, server, request: dict) -> dict:
    """What ``shardlm info`` shows under v2/v3/v3-2r: the offline modes this server serves and the
    memory its HE weight encodings hold so far (built on first use, kept for the process)."""
    cached = {k: v for k, v in he_cache(server.model).items() if k[0] == spec.name} if server.model else {}
    out = {"offline_modes": ["client", "he", "dealer"],
           "he": {"scheme": f"BFV N={bfv.N} t=2^{bfv.LOG_T} q={'+'.join(map(str, bfv.COEFF_BITS))} bits (SEAL)",
                  "weight_cache_bytes": sum(cached.values()), "blocks_cached": len(cached)}}
    if server.model is not None:
        out["memory"] = memory(server, spec.name)
    return out


def memory(server, variant: str) -> dict:
    """Resident bytes of ``variant``'s ring matrices built so far (units.resident: per integer
    weight and per model weight; matrices it shares with another variant count in both), and
    ``all_masked``: the masked variants' matrices together, each once."""
    res = units.resident(server.model, [v for v in FUSED if v in server.offered], server.config.device)
    mine = res["protocols"].get(variant, {"bytes": 0, "weights": 0})
    return {**mine, "all_masked": res["total"]}


# -- client --------------------------------------------------------------------------------------
class MaskedClient:
    """The client side of a v2/v3 session: drives the plan, offloading each linear unit."""

    def __init__(self, channel, model, variant: str, store: preprocess.MaterialStore | None,
                 fx: ring.FixedPoint = FIXED_POINT, embedding_source: str = "local", verify: bool = False,
                 streamed: range = range(0), source=None, first_rows: dict[str, int] | None = None,
                 reply_bits: str = "full"):
        """``store``: the material, or None to get ``first_rows`` from ``source`` (protocols/offline)
        in :meth:`setup`. ``streamed``: the prompt positions whose material is dealt chunk by chunk
        by ``source`` as the prefill reaches them; their dealing time adds to offline_ms.
        ``reply_bits``: ``low`` asks each unit's product for its public width only
        (protocols/lowbits.py), ``full`` for all 64 bits."""
        self.channel = channel
        self.model = model
        self.variant = variant
        self.fx = fx
        self.source, self.first_rows = source, first_rows
        self.progress = None
        self.store = None
        if store is not None:
            self._use(store)
        self.streamed = streamed
        self.offline_ms = 0.0
        self.units = units_for(model.plan, variant)
        self.unit_of = {u.ops[0].name: u for u in self.units.values()}
        self.encoding = encoding_for(model, variant)
        if reply_bits not in lowbits.MODES:
            raise ValueError(f"reply bits must be one of {', '.join(lowbits.MODES)}, not {reply_bits!r}")
        self.reply_bits = reply_bits
        self.activation_bits = lowbits.ACTIVATION_BITS  # part of the protocol; protocols/bench_lowbits varies it
        self.fraction_bits: dict[str, int] = {}  # per unit, the fewest fractional bits its inputs were given
        if embedding_source not in ("local", "ot"):
            raise ValueError(f"embedding source must be 'local' or 'ot', not {embedding_source!r}")
        self.embedding_source = embedding_source
        self.ot_receiver = None
        self.ref = Reference.of(model)  # for its KV cache and RoPE tables
        self.cache = None
        self.timings: dict[str, float] = {}
        # the check's secret keys for every unit, drawn now (offline work: U W needs no prompt)
        self.verifier = Verifier(matrices_for(model, variant)) if verify else None

    def _use(self, store: preprocess.MaterialStore) -> None:
        store.check_for(self.model.fingerprint(), self.variant, self.fx)
        self.store = store
        self.material = store  # where linear() takes rows: the store, or a streamed chunk's material

    async def setup(self) -> None:
        """The offline phase, when the material is not loaded from a store: the first chunk's rows
        from the source (dealt here, computed by the server under HE, or fetched from a dealer)."""
        if self.store is None:
            t0 = time.perf_counter()
            self._use(await self.source.deal(self.first_rows, self.progress))
            self.offline_ms += (time.perf_counter() - t0) * 1e3

    @property
    def offline(self) -> dict:
        """The offline phase's mode and costs (client/server CPU seconds; ciphertexts for he)."""
        mode = self.source.mode if self.source is not None else "material"
        return {"mode": mode, **(self.source.costs if self.source is not None else {})}

    @property
    def verification(self) -> dict | None:
        """What ``verify`` checked and what it cost (None without it)."""
        return self.verifier.stats() if self.verifier is not None else None

    def new_cache(self, capacity: int):
        self.cache = self.ref.new_cache(capacity)
        return self.cache

    def window(self, name: str, shift: int) -> tuple[int, int]:
        """The bits of a unit's products to ask for, (lowest, count): all 64, or from above the
        masks' zero bits as wide as the unit's public bound needs (protocols/lowbits.py)."""
        if self.reply_bits == "full":
            return 0, lowbits.RING_BITS
        return shift, lowbits.reply_bits([l1 for _, l1 in self.encoding[name]], shift, self.activation_bits)

    @property
    def protocol_stats(self) -> dict:
        """The reply width asked for, and the fewest fractional bits each kind of unit's inputs kept."""
        kinds: dict[str, int] = {}
        for name, f in self.fraction_bits.items():
            kind = name.rsplit(".", 1)[-1]
            kinds[kind] = min(f, kinds.get(kind, 64))
        return {"reply_bits": self.reply_bits, "fraction_bits_min": kinds}

    async def linear(self, ops: tuple[Linear, ...] | Composite, x) -> list[torch.Tensor]:
        comp = ops if isinstance(ops, Composite) else None
        unit = self.unit_of[comp.first.name if comp else ops[0].name]
        assert unit.composite == comp and (comp or unit.ops == ops), "the executor's grouping and the unit table disagree"
        parts = self.encoding[unit.name]
        # masks 2^shift r' (HE-made material): encode that many bits higher; the reply's window
        # (lo, width) gives 2^shift W x mod 2^(lo + width), so |2^shift W x| < 2^(lo + width - 2)
        shift = self.material.shift
        lo, width = self.window(unit.name, shift)

        def frac(v, l1):
            try:
                return self.fx.bits_for(float(v.abs().max()), l1 << shift, lo + width - 2)
            except OverflowError as exc:
                hint = "; run with --reply-bits full" if width < lowbits.RING_BITS else ""
                raise OverflowError(f"{unit.name}: {exc} of a {width}-bit reply{hint}") from None
        if comp is None:
            bits = [frac(x, parts[0][1])]
            encoded = self.fx.encode(x, bits[0])
        else:  # input [a | res]: a meets the first and the cross products, res the T product
            a, res = x
            bits_a = min(frac(a, l1) for _, l1 in parts[:2])
            bits = [bits_a, bits_a, frac(res, parts[2][1])]
            encoded = torch.cat([self.fx.encode(a, bits_a), self.fx.encode(res, bits[2])], dim=1)
        self.fraction_bits[unit.name] = min(min(bits), self.fraction_bits.get(unit.name, 64))
        n = encoded.shape[0]
        r, wr = self.material.take(unit.name, n)
        m = encoded * (1 << shift) - r
        t0 = time.perf_counter()
        window = {} if width == lowbits.RING_BITS else {"bits": width, "shift": lo}
        reply = await self.channel.request(MsgType.MASKED_LINEAR, {"unit": unit.name, "m": m.numpy(), **window},
                                           MsgType.MASKED_LINEAR_OK)
        self.timings["wait"] = self.timings.get("wait", 0.0) + time.perf_counter() - t0
        packed = MASKED_LINEAR_OK.check(reply, rows=n, row_bytes=lowbits.row_bytes(unit.out_dim, width))["y"]
        y = lowbits.unpack(packed, unit.out_dim, width)  # W (m >> lo) mod 2^width: m's low lo bits are zero
        if lo:
            m, wr = torch.bitwise_right_shift(m, lo), torch.bitwise_right_shift(wr, lo)
        z = lowbits.wrap(y + wr, width)  # 2^(shift - lo) W x
        if self.verifier is not None:
            try:
                self.verifier.check(unit.name, m, y, z, width)
            except VerificationError as exc:  # nothing of this reply is used; the server is told why
                await self.channel.send_error(exc.code, exc.message)
                raise
        if shift > lo:  # z = 2^(shift - lo) W x exactly (within the bound): the arithmetic shift is exact
            z = torch.bitwise_right_shift(z, shift - lo)
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
        """The logits of the last of ``ids``."""
        return (await self._material_then_forward(ids, all_logits=False))[-1]

    async def forward_rows(self, ids: list[int]) -> torch.Tensor:
        """The logits of every row of ``ids`` (speculative verification: the head gets every row)."""
        return await self._material_then_forward(ids, all_logits=True)

    def rollback(self, length: int) -> None:
        """Drop KV-cache positions from ``length`` on (drafts not accepted); the cache is the client's."""
        self.cache.truncate(length)

    async def _material_then_forward(self, ids: list[int], all_logits: bool) -> torch.Tensor:
        if self.cache.length in self.streamed:  # a later chunk of a long prompt: its material now
            t0 = time.perf_counter()
            with self.channel.phase("offline"):
                store = await self.source.deal(chunk_rows(self.model, self.variant, len(ids)))
            store.check_for(self.model.fingerprint(), self.variant, self.fx)
            self.material = store
            self.offline_ms += (time.perf_counter() - t0) * 1e3
        try:
            return await self._forward(ids, all_logits)
        finally:
            self.material = self.store

    async def _forward(self, ids: list[int], all_logits: bool) -> torch.Tensor:
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
                            precompose=self.variant in PRECOMPOSED, all_logits=all_logits)
        return await run_async(gen, self.linear)


def server_handler(spec, session) -> MaskedServerHandler:
    return MaskedServerHandler(session, spec.name)


def source_for(spec, channel, model, *, offline_mode: str, dealer: str | None = None,
               dealer_fingerprint: str | None = None, server_fingerprint: str | None = None):
    """The material source of ``--offline`` (protocols/offline)."""
    if offline_mode == "client":
        return offline.ClientSource(model, spec.name)
    if offline_mode == "he":
        return offline.HESource(channel, model, spec.name)
    if offline_mode == "dealer":
        if not dealer:
            raise OptionError("--offline dealer needs --dealer HOST:PORT (and --dealer-fingerprint to pin it)")
        if server_fingerprint is None and channel is not None:  # the server of this session: never the dealer
            server_fingerprint = peer_fingerprint(channel.stream)
        return offline.DealerSource(model, spec.name, dealer, dealer_fingerprint, server_fingerprint)
    raise OptionError(f"--offline: {offline_mode!r} is not one of {', '.join(offline.MODES)}")


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           embedding_source: str, material: str | None, verify: bool, offline_mode: str = "client",
           dealer: str | None = None, dealer_fingerprint: str | None = None, draft: str = "none",
           draft_len: int | None = None, reply_bits: str = "full") -> MaskedClient:
    """Online client with its material: loaded from a store (made ahead of time: offline_ms 0,
    the store's own dealing time reported as material_dealt_ms), or obtained in ``setup`` from the
    ``offline_mode`` source (the offline phase: the first prefill chunk and every decode step; a
    long prompt's later chunks are obtained as the prefill reaches them, so the material held at
    once follows the chunk, not the prompt). ``verify``: check every reply (protocols/verify.py);
    its keys count as offline time. ``draft``/``draft_len``: speculative decoding (party/speculative),
    K+1 material rows per decode forward. ``reply_bits``: protocols/lowbits.py."""
    rows = Drafting.from_options({"draft": draft, "draft_len": draft_len}).rows
    if verify and model.client_only:  # refused before any material is claimed
        raise ModelError(f"--verify checks replies against U W, which needs the linear weight matrices; {model.source} "
                         f"is an export-client directory without them: run without --verify, or from the full model")
    if material and offline_mode != "client":
        raise OptionError(f"--material already holds the offline phase's products; --offline {offline_mode} would make "
                          f"new ones: give one or the other")
    if offline_mode == "client" and model.client_only and not material:
        raise ModelError(f"--offline client computes W r with the linear weight matrices; {model.source} is an "
                         f"export-client directory without them: use --offline he or --offline dealer")
    t0 = time.perf_counter()
    if material:
        store = preprocess.MaterialStore.load(material)
        c = MaskedClient(channel, model, spec.name, store, embedding_source=embedding_source, verify=verify,
                         reply_bits=reply_bits)
        c.material_dealt_ms = store.meta["dealer_seconds"] * 1e3
        c.offline_ms = (c.verifier.setup_seconds if c.verifier is not None else 0.0) * 1e3
        return c
    source = source_for(spec, channel, model, offline_mode=offline_mode, dealer=dealer,
                        dealer_fingerprint=dealer_fingerprint)
    first = min(prompt_tokens, PREFILL_CHUNK)  # the first prefill forward's positions
    c = MaskedClient(channel, model, spec.name, None, embedding_source=embedding_source, verify=verify,
                     streamed=range(first, prompt_tokens), source=source,
                     first_rows=rows_needed(units_for(model.plan, spec.name), first, max_tokens, rows),
                     reply_bits=reply_bits)
    c.progress = progress
    c.offline_ms = (time.perf_counter() - t0) * 1e3
    return c


def preprocess_rows(spec, model, tokens: int) -> dict[str, int]:
    """``shardlm preprocess``: the rows of one generation of up to ``tokens`` positions, whatever
    the prompt/generation split (prompt 1 needs the most head rows, prompt tokens-1 the most body rows)."""
    return {n: tokens for n in units_for(model.plan, spec.name)}


def deal(spec, model, tokens: int, progress=None) -> preprocess.MaterialStore:
    """``shardlm preprocess --offline client``."""
    return offline.deal_locally(model, spec.name, preprocess_rows(spec, model, tokens), progress)


async def deal_remote(spec, model, tokens: int, *, offline_mode: str, client_config, dealer: str | None = None,
                      dealer_fingerprint: str | None = None, progress=None) -> tuple[preprocess.MaterialStore, dict]:
    """``shardlm preprocess --offline he|dealer``: the material and what it cost. With ``he`` a
    session of ``spec`` on the server carries only the HE exchange (its rows charged to the
    session's capacity like a generation's)."""
    rows = preprocess_rows(spec, model, tokens)
    if offline_mode == "dealer":
        source = source_for(spec, None, model, offline_mode="dealer", dealer=dealer,
                            dealer_fingerprint=dealer_fingerprint, server_fingerprint=client_config.fingerprint)
        return await source.deal(rows, progress), source.costs
    async with connect(client_config) as conn:
        await conn.open_session(spec.name, model.fingerprint(), capacity_bucket(tokens))
        source = source_for(spec, conn.channel, model, offline_mode=offline_mode)
        return await source.deal(rows, progress), source.costs
