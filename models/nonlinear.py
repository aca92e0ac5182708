"""The nonlinear stages of a plan (models/plan.py) as plain torch functions, the KV cache, and
`run_stage`, which runs any nonlinear step on an executor's named activations.

These run wherever the plaintext lives: in the reference executor, and on the client side of
a private protocol. Each matches the Hugging Face implementation's float32 arithmetic order
(e.g. RMSNorm scales after normalising, softmax in float32) so logits agree to ~1e-6.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .config import ModelConfig, ModelError
from .plan import Activation, Add, Attention, Embed, Linear, Norm, Step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def norm_linear(pre: torch.Tensor, x: torch.Tensor, norm: Norm, op: Linear, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """``op(norm(x))`` from ``pre = (W diag(g)) x``, the product a precomposed request returns
    (plan.Composite): the norm's row statistics of ``x`` applied after the product."""
    if norm.kind == "rms":
        out = pre * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    else:
        mu = x.mean(-1, keepdim=True)
        inv = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
        w_gain, w_bias = layer_norm_terms(op, norm, weights)
        out = (pre - mu * w_gain) * inv + w_bias
    return out + weights[op.bias] if op.bias else out


def layer_norm_term_names(op: Linear) -> tuple[str, str]:
    """Where a client export (models/client_dir.py) keeps ``op``'s (W g, W beta): it holds no W."""
    return f"{op.name}.norm_gain", f"{op.name}.norm_bias"


# (W g, W beta) per (linear weight tensor, norm): constants a decode step must not recompute.
# Keyed by the tensor's id, with a weak reference to tell a reused id from the same tensor.
_LN_TERMS: dict[tuple[int, str], tuple] = {}


def layer_norm_terms(op: Linear, norm: Norm, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W g, W beta)`` of ``op`` after the LayerNorm ``norm``: stored in a client export,
    else made from ``W`` once per weight tensor."""
    gain, bias = layer_norm_term_names(op)
    if gain in weights:
        return weights[gain], weights[bias]
    w = weights[op.weight]
    hit = _LN_TERMS.get((id(w), norm.name))
    if hit is None or hit[0]() is not w:
        hit = _LN_TERMS[(id(w), norm.name)] = (weakref.ref(w), w @ weights[norm.weight], w @ weights[norm.bias])
    return hit[1], hit[2]


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
    s = c.rope_scaling
    if s is None:
        return inv
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


class Rope:
    """cos/sin tables for positions, grown on demand (a decode step must not recompute them)."""

    def __init__(self, c: ModelConfig, device="cpu"):
        self.inv_freq = rope_inv_freq(c).to(device)
        self.cos = self.sin = torch.empty(0, c.head_dim, device=device)

    def tables(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 64)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device).float(), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[start:end], self.sin[start:end]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (heads, T, head_dim); rotate-half layout (as in HF checkpoints, not llama.cpp's)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values for every layer, (n_kv_heads, capacity, head_dim) each, grown by doubling.

    `length` counts committed positions; a forward pass writes its T new rows in every layer,
    then calls `advance(T)` once.
    """

    def __init__(self, config: ModelConfig, capacity: int = 256, device="cpu", dtype=torch.float32):
        self.config = config
        self.length = 0
        shape = (config.n_kv_heads, max(1, capacity), config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def _ensure(self, layer: int, end: int) -> None:
        cap = self.k[layer].shape[1]
        if end <= cap:
            return
        new_cap = max(end, 2 * cap)
        for store in (self.k, self.v):
            old = store[layer]
            grown = old.new_zeros(old.shape[0], new_cap, old.shape[2])
            grown[:, :cap] = old
            store[layer] = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (n_kv, T, d) rows after the committed ones; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[1]
        self._ensure(layer, end)
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (e.g. to re-run a prompt suffix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, n_heads: int,
              n_kv_heads: int, head_dim: int, cache: KVCache, rope: Rope | None,
              positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention of T new rows. q: (T, n_heads*d); k, v: (T, n_kv*d) -> (T, n_heads*d).

    By default row t is position cache.length + t and sees keys 0..cache.length + t. ``positions``
    (T,) and ``mask`` ((T, cache.length + T) bool, True = may attend) override both, e.g. to score
    T alternative tokens for one position at once (each row sees the cache and its own key only).
    """
    T, start = q.shape[0], cache.length
    end = start + T
    c = cache.config
    last = end if positions is None else int(positions.max()) + 1
    if last > c.max_positions:
        raise ModelError(f"sequence of {last} positions exceeds the model's maximum {c.max_positions}")
    q = q.view(T, n_heads, head_dim).transpose(0, 1)
    k = k.view(T, n_kv_heads, head_dim).transpose(0, 1)
    v = v.view(T, n_kv_heads, head_dim).transpose(0, 1)
    if rope is not None:
        if positions is None:
            cos, sin = rope.tables(start, end)
        else:
            cos, sin = rope.tables(0, int(positions.max()) + 1)
            cos, sin = cos[positions], sin[positions]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = cache.write(layer, k, v)
    # GQA without copying keys: each KV head serves `group` query heads.
    group = n_heads // n_kv_heads
    q = q.reshape(n_kv_heads, group * T, head_dim)
    scores = torch.matmul(q, keys.transpose(1, 2)) * (1.0 / math.sqrt(head_dim))
    window = c.sliding_window
    if mask is not None:
        if mask.shape != (T, end):
            raise ValueError(f"attention mask of shape {tuple(mask.shape)}, expected {(T, end)}")
        scores = scores.view(n_kv_heads, group, T, end).masked_fill(~mask, float("-inf"))
        scores = scores.view(n_kv_heads, group * T, end)
    elif T > 1 or (window is not None and end > window):
        # Query row t (position start+t) sees keys 0..start+t, and with a sliding window (Mistral)
        # only the last `window` of them. The cache keeps every key; the mask does the sliding.
        kpos, qpos = torch.arange(end, device=q.device)[None, :], torch.arange(start, end, device=q.device)[:, None]
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        scores = scores.view(n_kv_heads, group, T, end).masked_fill(~allowed, float("-inf"))
        scores = scores.view(n_kv_heads, group * T, end)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values).view(n_heads, T, head_dim)
    return out.transpose(0, 1).reshape(T, n_heads * head_dim)


def run_stage(step: Step, env: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], ids: torch.Tensor,
              cache: KVCache, rope: Rope | None, positions: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> None:
    """Run one nonlinear plan step on the named activations in `env` (in place). `ids` are this
    pass's token ids; positions start at `cache.length` (advanced by the caller after the pass),
    unless ``positions``/``mask`` say otherwise (see :func:`attention`)."""
    w = weights
    if isinstance(step, Norm):
        x = env[step.inp]
        if step.kind == "rms":
            env[step.out] = rms_norm(x, w[step.weight], step.eps)
        else:
            env[step.out] = layer_norm(x, w[step.weight], w[step.bias], step.eps)
    elif isinstance(step, Attention):
        env[step.out] = attention(env[step.q], env[step.k], env[step.v], layer=step.layer, n_heads=step.n_heads,
                                  n_kv_heads=step.n_kv_heads, head_dim=step.head_dim, cache=cache,
                                  rope=rope if step.rope else None, positions=positions, mask=mask)
    elif isinstance(step, Add):
        a, b = step.inputs
        env[step.out] = env[a] + env[b]
    elif isinstance(step, Activation):
        if step.kind == "silu_gate":
            env[step.out] = silu_gate(env[step.inputs[0]], env[step.inputs[1]])
        else:
            env[step.out] = gelu_tanh(env[step.inputs[0]])
    elif isinstance(step, Embed):
        x = F.embedding(ids, w[step.weight])
        if step.pos_weight:
            pos = positions if positions is not None else slice(cache.length, cache.length + ids.numel())
            x = x + w[step.pos_weight][pos]
        env[step.out] = x
    else:  # a new step kind must be taught to every executor
        raise TypeError(f"not a nonlinear plan step: {step!r}")
