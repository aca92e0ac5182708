"""The v3-mpc plan executor: a model's plan run with every activation shared.

Linear layers. Networked, the client first re-shares its share into a preprocessed mask ``r`` (it
sends ``x_c - r``; the server now holds ``x - r``), the server computes ``W (x - r)`` on its
device over the ring weights (weights.py) and the client takes ``W r`` from its mask material
(protocols/preprocess.py): no heavy linear work for the client online. (The simulator computes
``W x_c`` and ``W x_s``, the same sum.) Then the truncation by the rows' shifts ``k_j`` restores
scale 2^F; where an RMS norm, a RoPE attention or the gated MLP reads the layer's output next,
that truncation rides in their first round instead (:class:`shares.LazySum`).

RoPE: the rotations of q (with 1/sqrt(D) folded in) and k share one round of truncations.
Nonlinear layers run on the engine (approx.py) over the public :class:`Ranges`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..units import units_for
from .engine import Engine
from .shares import LazySum, Shared, cat
from .void import VOID
from .weights import mpc_matrices


@dataclasses.dataclass
class Ranges:
    """Public ranges the approximations are run for (a property of the model, not the prompt)."""

    # mean square of a norm's input: rsqrt is accurate (rel. err < 2e-3) for S = d * ms in
    # [d norm_lo, d norm_hi]; above, y = 1/sqrt(S) has few bits at scale 2^F (SmolLM2's
    # "massive activation" rows reach ms ~ 9e5: 2% error there)
    norm_lo: float = 1e-3
    norm_hi: float = 1e4
    softmax_shift: float = 0.0
    # secure comparisons (boolean AND triples): softmax subtracts the exact row max, and the
    # sigmoid's input is clipped to [-16, 16]; needed for real models (SmolLM2's centred scores
    # reach 34 and its gates 49)
    comparisons: bool = False

    @classmethod
    def wide(cls) -> "Ranges":
        """For SmolLM2-like models: mean squares up to 1e6, comparisons on."""
        return cls(norm_lo=1e-3, norm_hi=1e6, comparisons=True)


class MPCExecutor:
    """Runs a model's plan with every activation shared (both parties simulated by ``engine``).

    Linear units are the fused v3 units; the KV cache holds shares. Only the logits are
    revealed, to the client.
    """

    def __init__(self, model, engine: Engine | None = None, ranges: Ranges | None = None, store=None):
        """``store``: the client's mask material (preprocess.MaterialStore over :func:`mpc_matrices`),
        needed when ``engine`` is the client party of the networked protocol."""
        from ...models.reference import Reference
        self.model = model
        self.e = engine or Engine()
        self.store = store
        if self.e.role == "client" and store is None:
            raise ValueError("the v3-mpc client needs mask material (r, W r) for its linear layers")
        self.ranges = ranges or Ranges()
        self.mats = mpc_matrices(model)
        self.e.exact_max = self.e.clip_sigmoid = self.e.rsqrt_guess = self.ranges.comparisons
        self.units = units_for(model.plan, "v3")
        self.rope = Reference.of(model).rope
        self.length = 0
        self.k_cache: dict[int, Shared] = {}
        self.v_cache: dict[int, Shared] = {}

    def new_cache(self, capacity: int = 0):
        self.length = 0
        self.k_cache, self.v_cache = {}, {}

    def linear(self, ops, x: Shared, lazy: bool = False) -> list[Shared] | list[LazySum]:
        """``lazy`` (no bias): each op's output untruncated, as a :class:`LazySum` (the norm or the
        RoPE attention that reads it truncates it in a round of its own)."""
        key = ops[0].fuse_group if ops[0].fuse_group else ops[0].name
        W, k = self.mats[key]
        if self.e.role is None:  # simulator: the same products, both slots here
            y = self.e.ring_matmul(W, x)
        elif self.e.role == "client":  # re-share into the mask r; W r is preprocessed: no product online
            r, wr = self.store.take(key, x.shape[0])
            self.e.reshare(x, r)
            y = Shared(wr, VOID)
        else:  # the server multiplies its share x - r by the ring weights on its device
            x = self.e.reshare(x, None)
            y = Shared(VOID, self.e.transport.offload(lambda: W.matmul(x.s).cpu()))
        if lazy:  # no bias (checked by the caller): the truncation is the consumer's
            outs, at = [], 0
            for op in ops:
                outs.append(LazySum(None, y.map(lambda t, a=at, b=op.out_dim: t[:, a:a + b]), k[at:at + op.out_dim]))
                at += op.out_dim
            return outs
        y = self.e.trunc(y, k)
        outs, at = [], 0
        for op in ops:
            part = y.map(lambda t: t[:, at:at + op.out_dim])
            at += op.out_dim
            if op.bias:
                part = self.e.add_public(part, self.model.weights[op.bias].to(torch.float64))
            outs.append(part)
        return outs

    def norm(self, step, x: Shared | LazySum) -> tuple[Shared, Shared]:
        """RMSNorm / LayerNorm on shares; returns the output and x (its value, when x came as a
        :class:`LazySum`). ``S = sum x^2`` is formed from ``x / 2^8`` squared without
        truncation (scale 2^2F) and summed before one truncation by ``F - 16`` bits, so elements up
        to ~2^14 neither overflow the ring nor lose small rows' precision; ``1/sqrt(d)`` is folded
        into the public weight: ``x rsqrt(mean x^2 + eps) = sqrt(d) x rsqrt(S + d eps)``.
        An RMS norm of ``h + trunc(W a, k)`` (a LazySum) squares ``h / 2^8 + trunc(W a, k + 8)`` (one
        ulp more) and truncates ``W a`` by ``k`` in that round: the linear layer's truncation costs
        no round of its own."""
        e, w = self.e, self.model.weights
        d = x.shape[-1] if isinstance(x, Shared) else x.src.shape[-1]
        if step.kind == "layer":
            if isinstance(x, LazySum):
                raise ValueError("a LayerNorm's input is a value, not a LazySum")
            x = x - e.mul_public(x.sum(-1, keepdim=True), 1 / d).map(lambda t: t.expand(x.shape))
        # x / 2^8 (for S) and x * w sqrt(d) (what rsqrt multiplies); both truncations lazy: x/2^8's in
        # the round of its square, x w sqrt(d)'s in rsqrt's first product. w sqrt(d) with 12 fraction
        # bits: x w sqrt(d) 2^(F+12) stays below 2^62 for SmolLM2's massive activations (|x| ~ 2^14.5,
        # w sqrt(d) up to ~2^7); with 20 bits it overflowed the truncation
        wv = e.encode(w[step.weight].to(torch.float64) * math.sqrt(d), 12)
        if isinstance(x, LazySum):
            xs = e.lazy_trunc(x.src, x.k + 8)
            xs = xs if x.h is None else e.lazy_trunc(x.h, 8) + xs
            sq, o = e.run([("mul", xs, xs, None), ("force", e.lazy_trunc(x.src, x.k))])
            x = o if x.h is None else x.h + o
        else:
            xs = e.lazy_trunc(x, 8)
            (sq,) = e.run([("mul", xs, xs, None)])
        xw = e.lazy_trunc(e.mul_int(x, wv), 12)
        # S at scale 2^(2F-16); rsqrt compares it as is and truncates it by F - 16 on the way
        S = sq.sum(-1, keepdim=True)
        S = Shared(S.c + e.encode(torch.tensor(d * step.eps), 2 * e.f - 16), S.s)
        y = e.rsqrt(S, d * self.ranges.norm_lo, d * self.ranges.norm_hi, times=xw, extra=e.f - 16)
        if step.bias:
            y = e.add_public(y, w[step.bias].to(torch.float64))
        return y, x

    # RoPE on the qkv layer's untruncated output: cos and sin with this many fraction bits
    # (|q| 2^(F + 16 + 16) < 2^62 for |q| < 2^10; SmolLM2's q and k stay below 21)
    ROPE_BITS = 16

    def attention(self, step, q: Shared | LazySum, k: Shared | LazySum, v: Shared | LazySum) -> Shared:
        """``q``, ``k``, ``v`` as LazySums (the qkv layer's untruncated outputs, RoPE): the rotation
        runs on them (a rope pair of weight rows shares its shift) and one round truncates q (its
        1/sqrt(D) folded in), k and v, where the layer's truncation and the rotation's took two."""
        e = self.e
        lazy = isinstance(q, LazySum)
        T, start = (q.src if lazy else q).shape[0], self.length
        end = start + T
        H, KV, D = step.n_heads, step.n_kv_heads, step.head_dim
        if lazy:  # per-column shifts, laid out as the heads below
            ks = [z.k.view(n, 1, D).expand(n, T, D) for z, n in ((q, H), (k, KV), (v, KV))]
            q, k, v = q.src, k.src, v.src
        q = q.map(lambda t: t.view(T, H, D).transpose(0, 1))
        k = k.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        v = v.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        if step.rope:
            cos, sin = (t.to(torch.float64) for t in self.rope.tables(start, end))
            half = D // 2

            def rot(s: Shared) -> Shared:
                return s.map(lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1))

            # q's 1/sqrt(D) folded into its rotation: both rotations in one round of truncations
            b = self.ROPE_BITS if lazy else e.f
            sd = math.ceil(math.log2(math.sqrt(D)))  # 1/sqrt(D) keeps b bits: encoded with b + sd
            c, s_ = e.encode(cos, b), e.encode(sin, b)
            cq, sq = e.encode(cos / math.sqrt(D), b + sd), e.encode(sin / math.sqrt(D), b + sd)
            qr, kr = e.mul_int(q, cq) + e.mul_int(rot(q), sq), e.mul_int(k, c) + e.mul_int(rot(k), s_)
            if lazy:
                q, k, v = e.trunc_many([(qr, ks[0] + b + sd), (kr, ks[1] + b), (v, ks[2])])
            else:
                q, k = e.trunc_many([(qr, b + sd), (kr, b)])
        elif lazy:
            raise ValueError("untruncated q, k, v are for a RoPE attention")
        if step.layer in self.k_cache:
            k = cat([self.k_cache[step.layer], k], 1)
            v = cat([self.v_cache[step.layer], v], 1)
        self.k_cache[step.layer], self.v_cache[step.layer] = k, v
        group = H // KV
        q = q.map(lambda t: t.reshape(KV, group * T, D))
        (scores,) = e.matmul_many([(q, k.map(lambda t: t.transpose(1, 2)))])
        if not step.rope:
            scores = e.mul_public(scores, 1 / math.sqrt(D))
        kpos = torch.arange(end)[None, :]
        qpos = torch.arange(start, end)[:, None]
        allowed = kpos <= qpos
        window = self.model.config.sliding_window
        if window is not None:
            allowed &= kpos > qpos - window
        mask = allowed[None].expand(group, T, end).reshape(group * T, end)[None].expand(KV, group * T, end)
        out = e.softmax(scores, mask=mask, shift=self.ranges.softmax_shift, values=v)
        return out.map(lambda t: t.reshape(H, T, D).transpose(0, 1).reshape(T, H * D))

    def forward(self, ids: list[int] | None = None, n_tokens: int | None = None,
                all_logits: bool = False) -> torch.Tensor | None:
        """Logits (1, vocab) of the last position, revealed to the client. The server party has no
        ids: it passes ``n_tokens`` and gets None. ``all_logits`` (simulator only) reveals every
        position's logits: teacher forcing over a whole text in one forward, for accuracy tests."""
        from ...models.plan import Activation, Add, Attention, Embed, Linear, Norm

        plan, w, e = self.model.plan, self.model.weights, self.e
        n_tokens = len(ids) if ids is not None else n_tokens
        if all_logits and e.role is not None:
            raise ValueError("all_logits is for the two-party simulator: the protocol reveals the last position only")
        env: dict[str, Shared] = {}
        steps = plan.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            if i == plan.head_start and not all_logits:
                env[step.inp] = env[step.inp].map(lambda t: t[-1:])
            if isinstance(step, Linear):
                ops = [step]
                while step.fuse_group and i + len(ops) < len(steps) and \
                        getattr(steps[i + len(ops)], "fuse_group", None) == step.fuse_group:
                    ops.append(steps[i + len(ops)])
                # a residual's linear layer whose sum an RMS norm reads next, or the qkv layer of a RoPE
                # attention: its truncation rides in their first round
                nxt = steps[i + len(ops):i + len(ops) + 2]
                lazy = not any(op.bias for op in ops) and len(nxt) == 2 and (
                    len(ops) == 1 and isinstance(nxt[0], Add) and step.out in nxt[0].inputs
                    and isinstance(nxt[1], Norm) and nxt[1].kind == "rms" and nxt[1].inp == nxt[0].out
                    or isinstance(nxt[0], Attention) and nxt[0].rope
                    and {nxt[0].q, nxt[0].k, nxt[0].v} == {op.out for op in ops}
                    or isinstance(nxt[0], Activation) and nxt[0].kind == "silu_gate" and e.clip_sigmoid
                    and tuple(nxt[0].inputs) == tuple(op.out for op in ops))
                for op, out in zip(ops, self.linear(tuple(ops), env[step.inp], lazy=lazy)):
                    env[op.out] = out
                i += len(ops)
                continue
            if isinstance(step, Embed):  # the client's own input, shared
                if e.role == "server":
                    env[step.out] = e.share(shape=(n_tokens, w[step.weight].shape[1]))
                else:
                    x = torch.nn.functional.embedding(torch.tensor(ids, dtype=torch.long),
                                                      w[step.weight]).to(torch.float64)
                    if step.pos_weight:
                        x = x + w[step.pos_weight][self.length:self.length + n_tokens]
                    env[step.out] = e.share(x)
            elif isinstance(step, Norm):
                env[step.out], env[step.inp] = self.norm(step, env[step.inp])
            elif isinstance(step, Attention):
                env[step.out] = self.attention(step, env[step.q], env[step.k], env[step.v])
            elif isinstance(step, Add):
                env[step.out] = env[step.inputs[0]] + env[step.inputs[1]]
            elif isinstance(step, Activation):
                if step.kind == "silu_gate":
                    env[step.out] = e.silu_gate(env[step.inputs[0]], env[step.inputs[1]])
                else:
                    env[step.out] = e.gelu_tanh(env[step.inputs[0]])
            else:
                raise TypeError(f"not a plan step: {step!r}")
            i += 1
        self.length += n_tokens
        logits = e.reveal(env["logits"])
        return None if logits is None else logits.to(torch.float32)
