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


def matrices_for(model, variant: str, device="cpu", cache=None) -> dict[str, ring.RingMatrix | ComposedMatrix]:
    """The model's ring weights for ``variant``, built once per process (server and dealer alike)
    and shared between variants where a unit is the same (a single op, or the same fused group).
    A fused group is one matrix (one int8 GEMM call per unit: measured 2x faster for q/k/v
    than one call per op), so a server that runs v2 and v3 holds those weights twice."""
    return {name: matrix_for(model, u, device, cache) for name, u in units_for(model.plan, variant).items()}


def matrix_for(model, u: Unit, device="cpu", cache=None) -> ring.RingMatrix | ComposedMatrix:
    """One unit's matrix, made once per process under a key naming what it is (so v2 and v3 share
    a single op's). ``cache`` (protocols/matrix_cache.MatrixCache, a server's): read it from disk
    instead of building it when a valid copy is there, and store what is built."""
    def make():  # on the CPU: that is what the disk cache holds; another device gets a copy
        if u.composite is not None:
            return _composed(model, u.composite, "cpu")
        return ring.RingMatrix.from_float(unit_weight(u, model.weights), "cpu")  # one op, or a fused group
    key = matrix_key(u)
    if cache is not None:
        make = cache.wrap("-".join(key[1:]), [(b[3], b[1]) for b in blocks(u)], make)  # (out, in) per block
    if str(device) == "cpu":
        return model.derived((*key, "cpu"), make)
    return model.derived((*key, str(device)), lambda: to_device(make(), device))


def matrix_key(u: Unit) -> tuple[str, ...]:
    """The Model.derived key of a unit's matrix (without its device): what it is, not which
    variant asked, so variants share a unit they have in common."""
    if u.composite is not None:
        return ("masked", "composed", u.name)
    return ("masked", "op", u.ops[0].name) if len(u.ops) == 1 else ("masked", "fused", u.name)


def to_device(matrix, device):
    """A matrix built (or cached) on the CPU, moved to ``device``."""
    if isinstance(matrix, ComposedMatrix):
        return ComposedMatrix(to_device(matrix.a_side, device), to_device(matrix.t, device), matrix.encodings)
    return ring.RingMatrix.from_digits(matrix.digits, matrix.row_scales, matrix.max_abs, matrix.max_row_l1, device)


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
