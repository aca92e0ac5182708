"""Units: what the server multiplies for v2, v3 and v3-2r (and what v3-mpc's linear layers reuse).

A unit is one offload: the ops of the plan that share an input, computed as one matrix (``v3``
fuses q/k/v and gate/up; ``v2`` sends each op alone), or a precomposed pair (``v3-2r``: a residual
projection composed with the next norm and projection, models/plan.Composite). This module
decides the grouping (from the plan's own plan.group_at / plan.composite_at), builds each
unit's exact ring matrix (protocols/ring.py) once per process, with the model's other derived
values (Model.derived), and gives the client the public encodings it decodes products with.
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.config import ModelError
from ..models.plan import Composite, Linear, Plan
from ..party.generation import forwards
from . import ring

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


def _cached(model, key, make):
    return model.derived(("masked", *key), make)


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

    def prepare(self) -> None:
        self.a_side.prepare()
        self.t.prepare()

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        k = self.a_side.in_dim
        return torch.cat([self.a_side.matmul(m[:, :k]), self.t.matmul(m[:, k:])], dim=1)

    def left_matmul(self, u: torch.Tensor) -> torch.Tensor:
        """``u @ W mod 2^64`` for the whole block-diagonal ``W = [[a_side, 0], [0, t]]``."""
        o = self.a_side.out_dim
        return torch.cat([self.a_side.left_matmul(u[:, :o]), self.t.left_matmul(u[:, o:])], dim=1)


def _then(model, comp: Composite) -> tuple[torch.Tensor, torch.Tensor]:
    """``T`` (the ``then`` group's weights times the norm's gain) encoded: (integers, row scales)."""
    w = model.weights
    t = torch.cat([w[op.weight] for op in comp.then]).to(torch.float64) * w[comp.norm.weight].to(torch.float64)
    return ring.encode_weights(t)


def _leaves(model, u: Unit) -> list[tuple[tuple[str, ...], tuple[int, int], object]]:
    """The ring matrices a unit is made of, as (key, (out, in), build): one per op of a plain or
    fused unit (v2's and v3's are the same ones), and for a composite ``first`` (an op matrix
    too), ``cross = T first`` and ``T`` (ring.compose). The key names what a matrix is, not which
    variant asked: it is the Model.derived key and the disk cache's file name."""
    def op(o: Linear):
        return ("op", o.name), (o.out_dim, o.in_dim), lambda: ring.RingMatrix.from_float(model.weights[o.weight])
    comp = u.composite
    if comp is None:
        return [op(o) for o in u.ops]
    out2 = sum(o.out_dim for o in comp.then)

    def cross():
        ints, scales = ring.compose(*_then(model, comp), model.weights[comp.first.weight])
        return ring.RingMatrix(ints, "cpu", scales)

    def then():
        ints, scales = _then(model, comp)
        return ring.RingMatrix(ints, "cpu", scales)
    return [op(comp.first), (("cross", comp.name), (out2, comp.first.in_dim), cross),
            (("then", comp.name), (out2, comp.first.out_dim), then)]


def _leaf(model, key, shape, build, device, cache) -> ring.RingMatrix:
    """One ring matrix, made once per process: read from the disk cache when it holds a valid
    copy (built on the CPU, which is what the cache holds; another device gets a copy)."""
    make = build if cache is None else cache.wrap("-".join(key), [shape], build)
    if str(device) == "cpu":
        return model.derived(("masked", *key, "cpu"), make)
    return model.derived(("masked", *key, str(device)), lambda: to_device(make(), device))


def matrices_for(model, variant: str, device="cpu", cache=None) -> dict[str, ring.RingMatrix | ring.RowStack | ComposedMatrix]:
    """The model's ring weights for ``variant``, built once per process (server and dealer alike).
    Variants share every matrix they have in common: a fused unit is its ops' matrices stacked
    (ring.RowStack), a composite's ``first`` is the op's matrix, so v2 and v3 hold one encoding
    of the weights between them."""
    return {name: matrix_for(model, u, device, cache) for name, u in units_for(model.plan, variant).items()}


def matrix_for(model, u: Unit, device="cpu", cache=None) -> ring.RingMatrix | ring.RowStack | ComposedMatrix:
    """One unit's matrix, assembled from its shared leaves (:func:`_leaves`). ``cache``
    (protocols/matrix_cache.MatrixCache, a server's): leaves are read from disk instead of built
    when a valid copy is there, and stored when built."""
    def make():
        leaves = [_leaf(model, key, shape, build, device, cache) for key, shape, build in _leaves(model, u)]
        if u.composite is not None:
            first, cross, then = leaves
            return ComposedMatrix(ring.RowStack([first, cross]), then,
                                  [(m.row_scales, m.max_row_l1) for m in leaves])
        return leaves[0] if len(leaves) == 1 else ring.RowStack(leaves)
    return model.derived((*matrix_key(u), str(device)), make)


def matrix_key(u: Unit) -> tuple[str, ...]:
    """The Model.derived key of a unit's matrix (without its device): what it is, not which
    variant asked."""
    if u.composite is not None:
        return ("masked", "composed", u.name)
    return ("masked", "op", u.ops[0].name) if len(u.ops) == 1 else ("masked", "fused", u.name)


def cache_names(u: Unit) -> list[str]:
    """The disk cache's names of a unit's leaf matrices (protocols/matrix_cache)."""
    return ["-".join(key) for key, _shape, _build in _leaves(None, u)]


def to_device(matrix: ring.RingMatrix, device) -> ring.RingMatrix:
    """A ring matrix built (or cached) on the CPU, moved to ``device``."""
    return ring.RingMatrix(matrix.int_weights().to(torch.int64), device, matrix.row_scales)


def leaf_matrices(matrix) -> list[ring.RingMatrix]:
    """The ring matrices a unit's matrix holds (shared ones included)."""
    if isinstance(matrix, ComposedMatrix):
        return leaf_matrices(matrix.a_side) + leaf_matrices(matrix.t)
    return list(matrix.parts) if isinstance(matrix, ring.RowStack) else [matrix]


def resident(model, variants, device="cpu") -> dict:
    """Memory the masked protocols' matrices hold in this process, counting only what is built
    (never builds): per variant, its matrices' resident bytes (ring.RingMatrix.nbytes; a matrix
    two variants share counts in each) over the integer weights they encode and over the model's
    own linear weights (a v3-2r composite encodes more weights than the model has); and
    ``total``: every matrix once, over the model's weights and the variants that hold any."""
    seen: dict[int, ring.RingMatrix] = {}
    out = {}
    n_model = model_weights(model)
    for v in variants:
        mats: dict[int, ring.RingMatrix] = {}
        for u in units_for(model.plan, v).values():
            if model.has_derived((*matrix_key(u), str(device))):
                for m in leaf_matrices(matrix_for(model, u, device)):
                    mats[id(m)] = m
        if not mats:
            continue
        seen.update(mats)
        out[v] = _bytes_report(mats.values(), n_model)
    total = _bytes_report(seen.values(), n_model)
    total["bytes_per_model_weight_per_protocol"] = round(total["bytes_per_model_weight"] / max(len(out), 1), 3)
    return {"protocols": out, "total": total}


def _bytes_report(mats, n_model: int) -> dict:
    kinds: dict[str, int] = {}
    weights = 0
    for m in mats:
        weights += m.in_dim * m.out_dim
        for k, b in m.nbytes().items():
            kinds[k] = kinds.get(k, 0) + b
    b = sum(kinds.values())
    return {"bytes": b, "by_kind": kinds, "weights": weights, "bytes_per_weight": round(b / max(weights, 1), 3),
            "bytes_per_model_weight": round(b / max(n_model, 1), 3)}


def model_weights(model) -> int:
    """The model's linear weights (every op of the plan once: a tied head counts once)."""
    ops = {s.weight: s for s in model.plan.steps if isinstance(s, Linear)}
    return sum(o.in_dim * o.out_dim for o in ops.values())


def encoding_for(model, variant: str) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Per unit, per product part: the public row scales (to decode products) and the largest
    row L1 norm of the integer weights the server multiplies by (the fractional bits keep every
    product entry below 2^62 with it, ring.FixedPoint.bits_for: no wrap past 2^63, and
    protocols/verify's bound). One part for a plain or fused unit, three for a composed one.
    A client-only model (models/client_dir.py) has them stored, as its full model made them."""
    if model.client_only:
        if variant not in model.stored_encodings:
            raise ModelError(f"{model.source}: the export-client directory holds no encodings for {variant}")
        return model.stored_encodings[variant]

    def make():
        out = {}
        matrices = matrices_for(model, variant) if variant in PRECOMPOSED else {}
        for name, u in units_for(model.plan, variant).items():
            if u.composite is not None:
                out[name] = matrices[name].encodings
                continue
            # the very integers of the unit's RingMatrix (row scales are per row, so the same
            # whether the unit is fused or not)
            ints, scales = ring.encode_weights(unit_weight(u, model.weights))
            out[name] = [(scales, int(ints.abs().sum(dim=1).max()))]
        return out
    return _cached(model, ("encoding", variant), make)


def rows_needed(units: dict[str, Unit], prompt_tokens: int, max_tokens: int,
                rows_per_forward: int = 1) -> dict[str, int]:
    """Mask rows a generation uses: the prompt, then ``rows_per_forward`` rows per decode forward
    (max_tokens - 1 of them at most; K+1 with K drafts, party/speculative, rejected rows consumed
    too: material is single-use); the head one row per prefill forward (generation.forwards: a
    long prompt's prefill is several) and every row of a decode forward."""
    decode = max(max_tokens - 1, 0)
    body = prompt_tokens + decode * rows_per_forward
    head = forwards(prompt_tokens, max_tokens) + decode * (rows_per_forward - 1)
    return {name: (head if u.head else body) for name, u in units.items()}


def blocks(unit: Unit) -> list[tuple[int, int, int, int]]:
    """The plain products inside a unit as (in start, in len, out start, out len): one for a plain
    or fused unit; for a composite, ComposedMatrix's two: [first; cross] on ``a``, T on ``res``.
    Known from the plan alone (a client without weights knows them)."""
    comp = unit.composite
    if comp is None:
        return [(0, unit.in_dim, 0, unit.out_dim)]
    a_out = unit.out_dim - (unit.out_dim - comp.first.out_dim) // 2
    return [(0, comp.first.in_dim, 0, a_out), (comp.first.in_dim, comp.first.out_dim, a_out, unit.out_dim - a_out)]


def block_matrices(matrix) -> list[ring.RingMatrix]:
    """The server's ring matrices of a unit's blocks (in :func:`blocks` order)."""
    return [matrix.a_side, matrix.t] if isinstance(matrix, ComposedMatrix) else [matrix]
