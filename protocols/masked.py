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
decode step), timing, and that generation is happening.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch
import trio

from ..models.executor import forward_steps, run_async
from ..models.reference import Reference
from ..models.plan import Composite, Linear, Plan
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from . import preprocess, ring
from .ot import embedding
from .registry import ProtocolSpec, register

FUSED = {"v2": False, "v3": True, "v3-2r": True}
PRECOMPOSED = {"v3-2r"}  # variants whose plan runs with precomposed units (plan.Composite)
# Part of the protocol: the server encodes weights with these bits, the client decodes with them.
FIXED_POINT = ring.FixedPoint()


@dataclasses.dataclass(frozen=True)
class Unit:
    """One offload: ops sharing an input, computed as one (sum of outs, in) matrix; or a
    precomposed pair (``composite``): input ``[a | res]``, output ``[first(a) | T first(a) | T res]``."""

    name: str
    ops: tuple[Linear, ...]
    in_dim: int
    out_dim: int
    head: bool  # the LM head sees one row per forward (only the last position's logits)
    composite: Composite | None = None


def units_for(plan: Plan, variant: str) -> dict[str, Unit]:
    """The offload units in the order the executor meets them (its grouping, plan.group_at /
    plan.composite_at, is the one definition of what goes together)."""
    fused, precompose = FUSED[variant], variant in PRECOMPOSED
    units: dict[str, Unit] = {}
    i = 0
    while i < len(plan.steps):
        comp = plan.composite_at(i, fused) if precompose else None
        if comp is not None:
            out2 = sum(op.out_dim for op in comp.then)
            units[comp.name] = Unit(comp.name, (comp.first, *comp.then), comp.first.in_dim + comp.first.out_dim,
                                    comp.first.out_dim + 2 * out2, False, comp)
            i += 3 + len(comp.then)
        elif isinstance(plan.steps[i], Linear):
            ops = plan.group_at(i, fused)
            key = ops[0].fuse_group if fused and ops[0].fuse_group else ops[0].name
            units[key] = Unit(key, ops, ops[0].in_dim, sum(o.out_dim for o in ops), i > plan.head_start)
            i += len(ops)
        else:
            i += 1
    return units


def unit_weight(unit: Unit, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[op.weight] for op in unit.ops])


_BUILD_LOCK = threading.RLock()  # servers build matrices in worker threads: build each once


def _cached(model, key, make):
    with _BUILD_LOCK:
        cache = model.__dict__.setdefault("_masked_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]


class ComposedMatrix:
    """A precomposed unit (plan.Composite) on input ``[a | res]``, output
    ``[first(a) | (T first) a | T res]`` with ``T`` the ``then`` group's weights times the norm's
    gain: two GEMM calls (first and cross stacked share the input ``a``). The client decodes
    the three parts with their own row scales, so ``a`` and ``res`` may use different
    fixed-point scales."""

    def __init__(self, a_side: ring.RingMatrix, t: ring.RingMatrix, encodings: list[tuple[torch.Tensor, int]]):
        self.a_side, self.t = a_side, t
        self.encodings = encodings  # (row scales, integer row L1 bound) of first, cross, T
        self.in_dim = a_side.in_dim + t.in_dim
        self.out_dim = a_side.out_dim + t.out_dim

    def pack(self) -> bool:
        return self.a_side.pack() and self.t.pack()

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        k = self.a_side.in_dim
        return torch.cat([self.a_side.matmul(m[:, :k]), self.t.matmul(m[:, k:])], dim=1)


def _composed(model, comp: Composite, device) -> ComposedMatrix:
    w = model.weights
    t = torch.cat([w[op.weight] for op in comp.then]).to(torch.float64) * w[comp.norm.weight].to(torch.float64)
    first_int, first_scales = ring.encode_weights(w[comp.first.weight])
    t_int, t_scales = ring.encode_weights(t)
    cross_int, cross_scales = ring.compose(t_int, t_scales, w[comp.first.weight])

    def l1(ints):
        return int(ints.abs().sum(dim=1).max())
    a_side = ring.RingMatrix(torch.cat([first_int, cross_int]), device, torch.cat([first_scales, cross_scales]))
    return ComposedMatrix(a_side, ring.RingMatrix(t_int, device, t_scales),
                          [(first_scales, l1(first_int)), (cross_scales, l1(cross_int)), (t_scales, l1(t_int))])


def matrices_for(model, variant: str, device="cpu") -> dict[str, ring.RingMatrix | ComposedMatrix]:
    """The model's ring weights for ``variant``, built once per process (server and dealer alike)
    and shared between variants where a unit is the same (a single op, or the same fused group).
    A fused group is one matrix (one int8 GEMM call per unit: measured 2x faster for q/k/v
    than one call per op), so a server that runs v2 and v3 holds those weights twice."""
    def op_matrix(op: Linear):
        return _cached(model, ("op", op.name, str(device)),
                       lambda: ring.RingMatrix.from_float(model.weights[op.weight], device))

    def build(u: Unit):
        if u.composite is not None:
            return _cached(model, ("composed", u.name, str(device)), lambda: _composed(model, u.composite, device))
        if len(u.ops) == 1:
            return op_matrix(u.ops[0])
        return _cached(model, ("fused", u.name, str(device)),
                       lambda: ring.RingMatrix.from_float(unit_weight(u, model.weights), device))
    return {name: build(u) for name, u in units_for(model.plan, variant).items()}


def encoding_for(model, variant: str) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Per unit, per product part: the public row scales (to decode products) and the largest
    integer row L1 norm (to refuse an input whose product could wrap past 2^63 instead of
    decoding garbage). One part for a plain or fused unit, three for a composed one."""
    def make():
        out = {}
        matrices = matrices_for(model, variant) if variant in PRECOMPOSED else {}
        for name, u in units_for(model.plan, variant).items():
            if u.composite is not None:
                out[name] = matrices[name].encodings
                continue
            w = unit_weight(u, model.weights).to(torch.float64)
            scales = ring.row_scales(w)  # per row, so the same whether the unit is fused or not
            out[name] = [(scales, int(((w.abs().sum(dim=1) * scales).max()).ceil()))]
        return out
    return _cached(model, ("encoding", variant), make)


def rows_needed(units: dict[str, Unit], prompt_tokens: int, max_tokens: int) -> dict[str, int]:
    """Mask rows a generation uses: the prompt, then one row per decode step (max_tokens - 1
    of them); the head one row per forward."""
    body = prompt_tokens + max(max_tokens - 1, 0)
    return {name: (max(max_tokens, 1) if u.head else body) for name, u in units.items()}


def deal_for(model, variant: str, prompt_tokens: int, max_tokens: int, progress=None) -> preprocess.MaterialStore:
    """The client's dealer: material for generations of up to this shape."""
    units = units_for(model.plan, variant)
    return preprocess.deal(matrices_for(model, variant), rows_needed(units, prompt_tokens, max_tokens),
                           model_fingerprint=model.fingerprint(), variant=variant, fx=FIXED_POINT,
                           progress=progress)


# -- server --------------------------------------------------------------------------------------
def _server_matrices(model, variant: str, device) -> dict:
    """The variant's matrices with the decode kernel's packed weights made too (both once per
    process), so the first decode step does not stall the event loop."""
    matrices = matrices_for(model, variant, device)
    for W in matrices.values():
        W.pack()
    return matrices


class MaskedServerHandler:
    """Per session: answers MASKED_LINEAR with ``W m mod 2^64``. Accepts nothing but ring tensors."""

    message_types = frozenset({MsgType.MASKED_LINEAR, MsgType.OT_EMB_REQ})

    def __init__(self, session, variant: str):
        self.session = session
        self.variant = variant
        self.matrices = None  # built (once per process) on first use, off the event loop
        self.ot_sender = None

    async def handle(self, msg) -> None:
        if msg.type == MsgType.OT_EMB_REQ:  # --embedding ot: rows by 1-of-V OT, ids never sent
            self.ot_sender = await embedding.serve_rows(self.session.channel, self.session.server.model.embedding_table(),
                                                        request=msg.body, sender=self.ot_sender)
            return
        if self.matrices is None:  # seconds for a large model: other sessions keep being served
            server = self.session.server
            self.matrices = await trio.to_thread.run_sync(_server_matrices, server.model, self.variant,
                                                          server.config.device)
        body = msg.body
        if set(body) != {"unit", "m"}:
            raise ProtocolError(ErrorCode.MALFORMED, f"MASKED_LINEAR takes exactly 'unit' and 'm', got {sorted(body)}")
        W = self.matrices.get(body["unit"]) if isinstance(body["unit"], str) else None
        if W is None:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown unit {body['unit']!r}")
        m = body["m"]
        if not isinstance(m, np.ndarray) or m.dtype != np.int64 or m.ndim != 2 or m.shape[1] != W.in_dim:
            raise ProtocolError(ErrorCode.MALFORMED, f"'m' must be an int64 ring matrix (n, {W.in_dim})")
        if not 1 <= m.shape[0] <= self.session.max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"{m.shape[0]} rows exceed the session's max_seq_len")
        y = W.matmul(torch.from_numpy(m))
        await self.session.channel.send(MsgType.MASKED_LINEAR_OK, {"y": y.cpu().numpy()})




# -- client --------------------------------------------------------------------------------------
class MaskedClient:
    """The client side of a v2/v3 session: drives the plan, offloading each linear unit."""

    def __init__(self, channel, model, variant: str, store: preprocess.MaterialStore,
                 fx: ring.FixedPoint = FIXED_POINT, embedding_source: str = "local"):
        store.check_for(model.fingerprint(), variant, fx)
        self.channel = channel
        self.model = model
        self.variant = variant
        self.store = store
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
        r, wr = self.store.take(unit.name, n)
        m = encoded - r
        t0 = time.perf_counter()
        reply = await self.channel.request(MsgType.MASKED_LINEAR, {"unit": unit.name, "m": m.numpy()},
                                           MsgType.MASKED_LINEAR_OK)
        self.timings["wait"] = self.timings.get("wait", 0.0) + time.perf_counter() - t0
        y = reply.get("y")
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (n, unit.out_dim):
            raise ProtocolError(ErrorCode.MALFORMED, f"server returned a bad product for {unit.name}")
        y = torch.from_numpy(y) + wr
        decoded, at = [], 0
        for b, (scales, _) in zip(bits, parts):
            decoded.append(self.fx.decode_product(y[:, at:at + scales.numel()], b, scales))
            at += scales.numel()
        w = self.model.weights
        if comp is not None:  # first(a) with its bias; per `then` op T (res + first(a)), the executor finishes
            first = decoded[0] + w[comp.first.bias] if comp.first.bias else decoded[0]
            return [first, *torch.split(decoded[2] + decoded[1], [op.out_dim for op in comp.then], dim=1)]
        outs = torch.split(decoded[0], [op.out_dim for op in ops], dim=1)
        return [part + w[op.bias] if op.bias else part for op, part in zip(ops, outs)]

    async def forward(self, ids: list[int]) -> torch.Tensor:
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


def client_factory(variant: str):
    def make(channel, model, *, prompt_tokens: int, max_tokens: int, material: str | None = None,
             progress=None, embedding_source: str = "local", **_options) -> MaskedClient:
        """Online client with its material: loaded from a store, or dealt now (the offline phase)."""
        t0 = time.perf_counter()
        if material:
            store = preprocess.MaterialStore.load(material)
        else:
            store = deal_for(model, variant, prompt_tokens, max_tokens, progress=progress)
        client = MaskedClient(channel, model, variant, store, embedding_source=embedding_source)
        client.offline_ms = (store.meta["dealer_seconds"] if material else time.perf_counter() - t0) * 1e3
        return client
    return make


for _variant, _summary in (
    ("v2", "linear layers on the server over one-time-padded Z_2^64 inputs, one round per op (7L+1/token); "
           "nonlinear layers and KV cache on the client"),
    ("v3", "as v2 with fused q/k/v and gate/up, batched prefill, resident weights (4L+1 rounds/token)"),
    ("v3-2r", "as v3 with each residual projection precomposed with the next norm and projection "
              "(o with gate/up, down with the next q/k/v): 2L+2 rounds/token for ~1.9x the server's "
              "weight traffic; pays off when round trips are slow"),
):
    register(ProtocolSpec(
        name=_variant, private=True, summary=_summary, needs_model=True,
        server_handler=(lambda v: lambda session: MaskedServerHandler(session, v))(_variant),
        client_factory=client_factory(_variant),
    ))
