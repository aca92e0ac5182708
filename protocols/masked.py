"""v2 and v3: the server does every linear layer on one-time-padded ring inputs.

Client, per linear step of the plan: encode the input rows ``x`` in fixed point, take fresh
mask rows ``r`` and their product ``W r`` from the preprocessed material, send ``m = x - r``
(uniform in Z_2^64, so it says nothing about ``x``), receive ``W m`` computed exactly mod
2^64, and recover ``W x = W m + W r``. Biases, norms, RoPE, attention over the client's own
KV cache, activations and residuals run on the client in the clear. The server's view is a
unit name (public: the same schedule for every prompt) and uniform ring tensors.

- ``v2`` (the seeds' V2): one round per linear op, 7L+1 rounds per token for a SwiGLU model.
- ``v3``: ops sharing an input are one fused unit (q/k/v, gate/up), the whole prompt goes in
  one batch, weights stay resident on the server's device as float64 limb matrices:
  4L+1 rounds per token.

What it does not hide: the number of tokens processed per round (prompt length, then one per
decode step), timing, and that generation is happening.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..models.executor import forward_steps, run_async
from ..models.reference import Reference
from ..models.plan import Linear, Plan
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from . import preprocess, ring
from .ot import embedding
from .registry import ProtocolSpec, register

FUSED = {"v2": False, "v3": True}
# Part of the protocol: the server encodes weights with these bits, the client decodes with them.
FIXED_POINT = ring.FixedPoint()


@dataclasses.dataclass(frozen=True)
class Unit:
    """One offload: ops sharing an input, computed as one (sum of outs, in) matrix."""

    name: str
    ops: tuple[Linear, ...]
    in_dim: int
    out_dim: int
    head: bool  # the LM head sees one row per forward (only the last position's logits)


def units_for(plan: Plan, variant: str) -> dict[str, Unit]:
    fused = FUSED[variant]
    groups: dict[str, list[Linear]] = {}
    for op in plan.linears:
        key = op.fuse_group if fused and op.fuse_group else op.name
        groups.setdefault(key, []).append(op)
    head_ops = {s.name for s in plan.steps[plan.head_start:] if isinstance(s, Linear)}
    return {
        key: Unit(key, tuple(ops), ops[0].in_dim, sum(o.out_dim for o in ops), ops[0].name in head_ops)
        for key, ops in groups.items()
    }


def unit_weight(unit: Unit, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[op.weight] for op in unit.ops])


def _cached(model, key, make):
    cache = model.__dict__.setdefault("_masked_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


class FusedMatrix:
    """A unit of several ops: one product per op, concatenated (the ops' matrices are shared
    with the unfused variant, so a server offering v2 and v3 holds the weights once)."""

    def __init__(self, parts: list[ring.RingMatrix]):
        self.parts = parts
        self.in_dim = parts[0].in_dim
        self.out_dim = sum(p.out_dim for p in parts)

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.matmul(m) for p in self.parts], dim=1)


def matrices_for(model, variant: str, device="cpu") -> dict[str, ring.RingMatrix | FusedMatrix]:
    """The model's ring weights for ``variant``, built once per process (server and dealer alike)."""
    ops = _cached(model, ("op-matrices", str(device)), lambda: {
        op.name: ring.RingMatrix.from_float(model.weights[op.weight], device) for op in model.plan.linears})
    return {name: ops[u.ops[0].name] if len(u.ops) == 1 else FusedMatrix([ops[o.name] for o in u.ops])
            for name, u in units_for(model.plan, variant).items()}


def encoding_for(model, variant: str) -> dict[str, tuple[torch.Tensor, int]]:
    """Per unit: the public row scales (to decode products) and the largest integer row L1 norm
    (to refuse an input whose product could wrap past 2^63 instead of decoding garbage)."""
    def make():
        out = {}
        for name, u in units_for(model.plan, variant).items():
            w = unit_weight(u, model.weights).to(torch.float64)
            scales = ring.row_scales(w)  # per row, so the same whether the unit is fused or not
            out[name] = (scales, int(((w.abs().sum(dim=1) * scales).max()).ceil()))
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
class MaskedServerHandler:
    """Per session: answers MASKED_LINEAR with ``W m mod 2^64``. Accepts nothing but ring tensors."""

    message_types = frozenset({MsgType.MASKED_LINEAR, MsgType.OT_EMB_REQ})

    def __init__(self, session, variant: str):
        self.session = session
        self.matrices = matrices_for(session.server.model, variant, session.server.config.device)
        self.ot_sender = None

    async def handle(self, msg) -> None:
        if msg.type == MsgType.OT_EMB_REQ:  # --embedding ot: rows by 1-of-V OT, ids never sent
            self.ot_sender = await embedding.serve_rows(self.session.channel, self.session.server.model.embedding_table(),
                                                        request=msg.body, sender=self.ot_sender)
            return
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

    async def linear(self, ops: tuple[Linear, ...], x: torch.Tensor) -> list[torch.Tensor]:
        unit = self.unit_of[ops[0].name]
        assert unit.ops == ops, "the executor's grouping and the unit table disagree"
        scales, l1_bound = self.encoding[unit.name]
        bits = self.fx.bits_for(float(x.abs().max()), l1_bound)
        r, wr = self.store.take(unit.name, x.shape[0])
        m = self.fx.encode(x, bits) - r
        t0 = time.perf_counter()
        reply = await self.channel.request(MsgType.MASKED_LINEAR, {"unit": unit.name, "m": m.numpy()},
                                           MsgType.MASKED_LINEAR_OK)
        self.timings["wait"] = self.timings.get("wait", 0.0) + time.perf_counter() - t0
        y = reply.get("y")
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (x.shape[0], unit.out_dim):
            raise ProtocolError(ErrorCode.MALFORMED, f"server returned a bad product for {unit.name}")
        full = self.fx.decode_product(torch.from_numpy(y) + wr, bits, scales)
        outs, at = [], 0
        w = self.model.weights
        for op in ops:
            part = full[:, at:at + op.out_dim]
            at += op.out_dim
            outs.append(part + w[op.bias] if op.bias else part)
        return outs

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
                            self.ref.rope, fuse=FUSED[self.variant], timings=self.timings, embedded=embedded)
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
):
    register(ProtocolSpec(
        name=_variant, private=True, summary=_summary, needs_model=True,
        server_handler=(lambda v: lambda session: MaskedServerHandler(session, v))(_variant),
        client_factory=client_factory(_variant),
    ))
