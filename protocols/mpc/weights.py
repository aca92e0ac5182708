"""The server's linear weights on the ring: integers with a public per-row power-of-two scale.

A weight row j encodes as ``round(W_j 2^k_j)`` with ``k_j`` public (about 20 significant bits per
row, ``k_j <= WEIGHT_BITS``), so a linear layer's output comes at scale ``2^(F + k_j)`` and one
truncation by ``k_j`` (engine.py) restores scale 2^F. The client's mask material ``(r, W r)``
is dealt over these same ring weights in the offline phase (service.py, protocols/preprocess.py).
"""

from __future__ import annotations

import torch

from .. import ring
from ..units import unit_weight, units_for


WEIGHT_BITS = 16  # a row encodes as round(W * 2^k_j), k_j <= WEIGHT_BITS: products stay below 2^(F+16) per unit


def encode_weights_pow2(w: torch.Tensor, partner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float (out, in) -> (int64 weights, per-row public shifts k_j). ``partner``: row j's shift is
    also row ``partner[j]``'s (the smaller of the two): RoPE rotates rows j and j + D/2 of each
    head together, and on untruncated products they must share their scale."""
    w = w.to(torch.float64)
    peak = w.abs().amax(dim=1).clamp_min(1e-30)
    k = torch.clamp(torch.floor(torch.log2(ring.WMAX / peak)), max=WEIGHT_BITS).to(torch.int64)
    if partner is not None:
        k = torch.minimum(k, k[partner])
    w_int = torch.round(w * torch.pow(2.0, k.to(torch.float64))[:, None]).to(torch.int64)
    return w_int.clamp_(-ring.WMAX, ring.WMAX), k


def mpc_matrices(model) -> dict[str, tuple[ring.RingMatrix, torch.Tensor]]:
    rope = _rope_linears(model.plan)

    def make():
        out = {}
        for name, u in units_for(model.plan, "v3").items():
            partner, at = [], 0
            for op in u.ops:  # rows j and j + D/2 of each rotated head share their shift
                rows = torch.arange(op.out_dim)
                if op.name in rope:
                    D = rope[op.name]
                    rows = rows // D * D + (rows % D + D // 2) % D
                partner.append(rows + at)
                at += op.out_dim
            w_int, k = encode_weights_pow2(unit_weight(u, model.weights), torch.cat(partner))
            out[name] = (ring.RingMatrix(w_int), k)
        return out
    return model.derived(("mpc", "matrices"), make)


def _rope_linears(plan) -> dict[str, int]:
    """The linear steps whose outputs a RoPE attention rotates (its q and k), with the head dim."""
    from ...models.plan import Attention, Linear

    made, out = {}, {}
    for step in plan.steps:
        if isinstance(step, Linear):
            made[step.out] = step.name
        elif isinstance(step, Attention) and step.rope:
            out.update({made[step.q]: step.head_dim, made[step.k]: step.head_dim})
    return out

