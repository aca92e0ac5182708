"""A model described once, as an ordered list of steps.

Two kinds of step:
- `Linear`: a pure `out = inp @ W.T (+ b)` on named activations. Private protocols give these to
  the server (which holds the weights); ops sharing an input carry the same `fuse_group` (q/k/v,
  gate/up) so an executor may run them as one matmul.
- nonlinear stages (`Embed`, `Norm`, `Attention`, `Activation`, `Add`): run by whoever holds the
  plaintext (the client in a private protocol), with the functions in models/nonlinear.py.

Activations are rows: a (T, dim) float tensor per name, T = positions in this forward pass.
Names are reused layer after layer (`x` is the residual stream), so an executor's environment
stays small. The plan is interpreted in exactly one place, models/executor.py (`forward_steps`):
it runs the nonlinear stages and hands each linear step (or fused group) to its caller — the
plaintext reference computes `x @ W.T + b`, a private protocol's client masks `x` and asks the
server.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .config import ModelConfig


@dataclass(frozen=True)
class Linear:
    name: str
    weight: str  # key in Model.weights, layout (out_dim, in_dim)
    bias: str | None
    inp: str
    out: str
    in_dim: int
    out_dim: int
    fuse_group: str | None = None


@dataclass(frozen=True)
class Embed:
    name: str
    out: str
    weight: str  # (vocab, hidden) rows looked up by token id
    pos_weight: str | None = None  # learned absolute positions (gpt2), added to the rows


@dataclass(frozen=True)
class Norm:
    name: str
    inp: str
    out: str
    kind: str  # "rms" | "layer"
    weight: str
    bias: str | None
    eps: float


@dataclass(frozen=True)
class Attention:
    """Causal self-attention over the KV cache of `layer`: RoPE (if `rope`) on q and k, GQA."""
    name: str
    layer: int
    q: str
    k: str
    v: str
    out: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: bool


@dataclass(frozen=True)
class Activation:
    name: str
    kind: str  # "silu_gate": silu(inputs[0]) * inputs[1]; "gelu_tanh": gelu(inputs[0])
    inputs: tuple[str, ...]
    out: str


@dataclass(frozen=True)
class Add:
    name: str
    inputs: tuple[str, str]
    out: str


Step = Union[Linear, Embed, Norm, Attention, Activation, Add]


@dataclass(frozen=True)
class Composite:
    """A linear op whose output joins the residual stream, precomposed with the next norm and
    the linear group reading it (o with gate/up, down with the next layer's q/k/v).

    Because a norm only scales (and, for LayerNorm, centres) its input row by statistics of that
    row, ``then(norm(res + first(a)))`` is ``(T res + T first(a) - mu T g) / sigma + T beta + b``
    with ``T = W_then diag(g)``: linear in ``(a, res)`` up to per-row scalars the client computes
    from the new residual. So one request returns ``first(a)``, ``T res`` and ``(T W_first) a``
    and saves a round per pair (models/executor.py finishes the norm).
    """
    first: Linear
    add: Add
    norm: Norm
    then: tuple[Linear, ...]

    @property
    def name(self) -> str:
        return f"{self.first.name}+{self.then[0].fuse_group or self.then[0].name}"

    @property
    def residual(self) -> str:
        """The residual-stream activation that ``first``'s output is added to."""
        a, b = self.add.inputs
        return a if b == self.first.out else b


@dataclass(frozen=True)
class Plan:
    config: ModelConfig
    steps: tuple[Step, ...]
    # Index of the final norm: from here on every position is independent, so an executor that
    # only needs the last position's logits may keep just that row of the norm's input.
    head_start: int

    @property
    def linears(self) -> list[Linear]:
        return [s for s in self.steps if isinstance(s, Linear)]

    def layer_steps(self, a: int, b: int) -> tuple[int, int]:
        """Step indices ``[lo, hi)`` of layers ``a..b-1`` (each layer's steps are contiguous and
        named ``layers.<i>.*``); ``a == b`` gives an empty range where layer ``a`` would start."""
        L = self.config.n_layers
        if not 0 <= a <= b <= L:
            raise ValueError(f"layer range [{a}, {b}) is not within the model's {L} layers")
        starts = [i for i, s in enumerate(self.steps) if s.name.startswith("layers.") and s.name.endswith(".attn_norm")]
        bounds = starts + [self.head_start]
        return bounds[a], bounds[b]

    def group_at(self, i: int, fuse: bool) -> tuple[Linear, ...]:
        """The linear step at ``i`` and, when fusing, the rest of its fuse group after it."""
        steps = self.steps
        ops = [steps[i]]
        if fuse and steps[i].fuse_group:
            while i + len(ops) < len(steps) and getattr(steps[i + len(ops)], "fuse_group", None) == steps[i].fuse_group:
                ops.append(steps[i + len(ops)])
        return tuple(ops)

    def composite_at(self, i: int, fuse: bool) -> Composite | None:
        """The :class:`Composite` starting at linear step ``i``, if the steps there have its
        shape: a single op, an Add of its output into the residual, a norm of the sum that is
        not the final norm (the head is not precomposed: its matrix would be vocab x ffn), and
        the linear group reading the norm."""
        s = self.steps
        if i + 3 >= len(s) or not isinstance(s[i], Linear) or len(self.group_at(i, fuse)) != 1:
            return None
        add, norm, nxt = s[i + 1], s[i + 2], s[i + 3]
        if not (isinstance(add, Add) and s[i].out in add.inputs and add.out in add.inputs
                and isinstance(norm, Norm) and norm.inp == add.out and i + 2 != self.head_start
                and isinstance(nxt, Linear) and nxt.inp == norm.out):
            return None
        return Composite(s[i], add, norm, self.group_at(i + 3, fuse))

    def composites(self, fuse: bool = True) -> list[Composite]:
        """Every composite, in the order an executor meets them."""
        out, i = [], 0
        while i < len(self.steps):
            c = self.composite_at(i, fuse)
            if c is None:
                i += 1
            else:
                out.append(c)
                i += 3 + len(c.then)
        return out

    def fuse_groups(self) -> dict[str, list[Linear]]:
        groups: dict[str, list[Linear]] = {}
        for s in self.linears:
            if s.fuse_group:
                groups.setdefault(s.fuse_group, []).append(s)
        return groups

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the plan reads, with its shape: what a loader must provide."""
        c = self.config
        shapes: dict[str, tuple[int, ...]] = {}
        for s in self.steps:
            if isinstance(s, Linear):
                shapes[s.weight] = (s.out_dim, s.in_dim)
                if s.bias:
                    shapes[s.bias] = (s.out_dim,)
            elif isinstance(s, Embed):
                shapes[s.weight] = (c.vocab, c.hidden)
                if s.pos_weight:
                    shapes[s.pos_weight] = (c.max_positions, c.hidden)
            elif isinstance(s, Norm):
                shapes[s.weight] = (c.hidden,)
                if s.bias:
                    shapes[s.bias] = (c.hidden,)
        return shapes


def build_plan(c: ModelConfig) -> Plan:
    layer_norm = c.norm == "layer"

    def norm(name: str, inp: str, out: str) -> Norm:
        return Norm(name, inp, out, c.norm, f"{name}.weight", f"{name}.bias" if layer_norm else None, c.norm_eps)

    def linear(name: str, inp: str, out: str, d_in: int, d_out: int, bias: bool, group=None) -> Linear:
        return Linear(name, f"{name}.weight", f"{name}.bias" if bias else None, inp, out, d_in, d_out, group)

    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    steps: list[Step] = [Embed("embed", "x", "embed", "pos_embed" if c.family == "gpt2" else None)]
    for i in range(c.n_layers):
        p = f"layers.{i}"
        steps += [
            norm(f"{p}.attn_norm", "x", "h"),
            linear(f"{p}.q", "h", "q", c.hidden, q_dim, c.qkv_bias, f"{p}.qkv"),
            linear(f"{p}.k", "h", "k", c.hidden, kv_dim, c.qkv_bias, f"{p}.qkv"),
            linear(f"{p}.v", "h", "v", c.hidden, kv_dim, c.qkv_bias, f"{p}.qkv"),
            Attention(f"{p}.attn", i, "q", "k", "v", "a", c.n_heads, c.n_kv_heads, c.head_dim, c.uses_rope),
            linear(f"{p}.o", "a", "o", q_dim, c.hidden, c.o_bias),
            Add(f"{p}.attn_residual", ("x", "o"), "x"),
            norm(f"{p}.mlp_norm", "x", "h"),
        ]
        if c.activation == "silu_gate":
            steps += [
                linear(f"{p}.gate", "h", "g", c.hidden, c.ffn, c.mlp_bias, f"{p}.gate_up"),
                linear(f"{p}.up", "h", "u", c.hidden, c.ffn, c.mlp_bias, f"{p}.gate_up"),
                Activation(f"{p}.act", "silu_gate", ("g", "u"), "m"),
            ]
        else:
            steps += [
                linear(f"{p}.up", "h", "u", c.hidden, c.ffn, c.mlp_bias),
                Activation(f"{p}.act", "gelu_tanh", ("u",), "m"),
            ]
        steps += [
            linear(f"{p}.down", "m", "d", c.ffn, c.hidden, c.mlp_bias),
            Add(f"{p}.mlp_residual", ("x", "d"), "x"),
        ]
    head_start = len(steps)
    steps.append(norm("final_norm", "x", "h"))
    head_weight = "embed" if c.tie_embeddings else "lm_head.weight"
    steps.append(Linear("lm_head", head_weight, None, "h", "logits", c.hidden, c.vocab))
    return Plan(c, tuple(steps), head_start)
