"""v3-mpc arithmetic: every activation additively shared over Z_2^64, nonlinear layers on shares.

STATUS: this module is the share arithmetic and a plan executor run by a *two-party simulator*
(:class:`Engine` holds both parties' shares in one process and counts what would cross the
wire: openings, rounds, triples). The networked protocol (client and server tasks exchanging
these openings over a Channel) is not written yet; the simulator is what its two halves will
compute, step for step, and what the accuracy tests measure.

Encoding. A real ``x`` is the ring element ``round(x * 2^F)`` (``F = FRAC_BITS``), read as a
signed int64; shares ``x = x_c + x_s mod 2^64``.

Truncation (after each product, which doubles the scale): SecureML local truncation. The
client replaces its share ``x_c`` by ``x_c >> k`` (arithmetic shift); the server replaces
``x_s`` by ``-((-x_s) >> k)``. The result is ``x >> k`` up to one unit in the last place
*unless* the two shares wrap around 2^63 when added, which for a uniform share happens with
probability ``|x| / 2^63``; then the result is off by ``2^(64-k)`` (a gross error). With
``F = 20`` a product of value ``v`` sits at scale 2^2F before truncation, so the failure
probability is ``|v| 2^40 / 2^63 = |v| 2^-23`` per truncated element: 2^-23 for values around
1, 2^-13 for values near 2^10. (F = 16 would make that 2^-27 but costs an order of magnitude
of accuracy in every function below; accuracy was put first.)

Linear layers. The server's weights are integers with a per-row power-of-two scale
``2^k_j`` (``k_j`` public, about 20 significant bits per row): the product of shares by the
weights is local to each party (client: ``W x_c``, the preprocessed ``W r`` of v3; server:
``W x_s`` on its device), then a per-row local truncation by ``k_j`` restores scale 2^F.

Nonlinear functions (each documented with its range and measured error in the tests):

- ``exp``: limit form ``(1 + x/2^n)^(2^n)`` with a cubic Taylor base, n squarings; accurate
  for x in [-12, 8] (rel. err < 2e-3 at F = 20); x above ~10 overflows the ring.
- ``reciprocal``: Newton ``y <- y (2 - x y)`` from ``y0 = 3 exp(0.5 - x) + 0.003``, for x in
  [0.01, 500] (14 iterations, rel. err < 1e-3).
- ``rsqrt``: Newton ``y <- y (3 - x y^2) / 2`` from ``y0 = 1/sqrt(hi)``, x in [lo, hi] given by
  the caller (the norm's public range), rel. err < 1e-3.
- ``sigmoid(x) = e^{x/2} / (e^{x/2} + e^{-x/2})``, for x in [-16, 16]; SiLU = x sigmoid(x)
  (abs. err < 2e-3 on [-16, 16]); GELU(tanh) through ``0.5 (1 + tanh(z)) = sigmoid(2z)``,
  for x in [-4, 4] only (beyond, 2z leaves the sigmoid's range).
- ``softmax``: scores minus their row mean (linear, exact) minus a public shift, exp, masked by
  the public causal mask (multiplication by 0/1 constants), sum, reciprocal. No comparison
  protocol is used, so there is no exact max: the range treatment is that the row-mean-centred
  scores must stay below ~6 + shift and a row hold at most 64 keys (the sum / n enters the
  reciprocal's range); the tests document the range covered.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import beaver, ring

FRAC_BITS = 20


@dataclasses.dataclass
class Shared:
    c: torch.Tensor  # client share (int64)
    s: torch.Tensor  # server share (int64)

    @property
    def shape(self):
        return self.c.shape

    def __add__(self, o: "Shared") -> "Shared":
        return Shared(self.c + o.c, self.s + o.s)

    def __sub__(self, o: "Shared") -> "Shared":
        return Shared(self.c - o.c, self.s - o.s)

    def __neg__(self) -> "Shared":
        return Shared(-self.c, -self.s)

    def map(self, fn) -> "Shared":
        """A local, share-wise linear rearrangement (view, transpose, slice, cat of one)."""
        return Shared(fn(self.c), fn(self.s))

    def sum(self, dim, keepdim=False) -> "Shared":
        return Shared(self.c.sum(dim, keepdim=keepdim), self.s.sum(dim, keepdim=keepdim))


def cat(xs: list[Shared], dim: int) -> Shared:
    return Shared(torch.cat([x.c for x in xs], dim), torch.cat([x.s for x in xs], dim))


@dataclasses.dataclass
class Stats:
    rounds: int = 0            # openings rounds (each a message each way)
    opened_elements: int = 0   # ring elements opened (each costs 8 bytes each way)
    shared_elements: int = 0   # ring elements re-shared by the client (client -> server)
    revealed_elements: int = 0  # ring elements revealed to the client (logits only)


class Engine:
    """Two-party simulator: both shares in one process, openings counted as rounds."""

    def __init__(self, provider: beaver.TripleProvider | None = None, frac_bits: int = FRAC_BITS,
                 record: bool = False):
        self.provider = provider or beaver.DealerProvider()
        self.f = frac_bits
        self.prg = ring.MaskPRG()
        self.stats = Stats()
        # record=True keeps every opened value and every share the client sent: the server's view
        self.view: list[torch.Tensor] | None = [] if record else None

    # -- encoding, sharing, opening ---------------------------------------------------------
    def encode(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        return torch.round(x.to(torch.float64) * 2.0 ** (self.f if bits is None else bits)).to(torch.int64)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64) / 2.0 ** self.f

    def share(self, x: torch.Tensor) -> Shared:
        """The client's input: its share is a fresh mask r, the server receives enc(x) - r."""
        r = self.prg.ring(*x.shape)
        self.stats.shared_elements += x.numel()
        sent = self.encode(x) - r
        if self.view is not None:
            self.view.append(sent.clone())
        return Shared(r, sent)

    def reveal(self, x: Shared) -> torch.Tensor:
        """The server sends its share to the client (only for the logits)."""
        self.stats.revealed_elements += x.c.numel()
        return self.decode(x.c + x.s)

    def open(self, xs: list[Shared]) -> list[torch.Tensor]:
        """One round: every value in ``xs`` opened to both parties."""
        self.stats.rounds += 1
        self.stats.opened_elements += sum(x.c.numel() for x in xs)
        out = [x.c + x.s for x in xs]
        if self.view is not None:
            self.view += [o.clone() for o in out]
        return out

    # -- local operations ---------------------------------------------------------------------
    def trunc(self, x: Shared, k: int | torch.Tensor) -> Shared:
        """SecureML local truncation by ``k`` bits (see module docstring for its failure rate)."""
        return Shared(torch.bitwise_right_shift(x.c, k), -torch.bitwise_right_shift(-x.s, k))

    def add_public(self, x: Shared, v: torch.Tensor | float) -> Shared:
        v = self.encode(torch.as_tensor(v))
        return Shared(x.c + v, x.s.clone() if v.dim() == 0 else x.s + torch.zeros_like(v))

    def mul_public(self, x: Shared, v: torch.Tensor | float, bits: int | None = None) -> Shared:
        """``x * v`` for a public real ``v`` (encoded with ``bits``, default F), truncated back."""
        bits = self.f if bits is None else bits
        e = self.encode(torch.as_tensor(v), bits)
        return self.trunc(Shared(x.c * e, x.s * e), bits)

    def mul_int(self, x: Shared, v: torch.Tensor | int) -> Shared:
        """``x * v`` for a public integer (e.g. a 0/1 mask): exact, no truncation."""
        v = torch.as_tensor(v, dtype=torch.int64)
        return Shared(x.c * v, x.s * v)

    # -- Beaver products ------------------------------------------------------------------------
    def mul_many(self, pairs: list[tuple[Shared, Shared]], truncate: bool = True) -> list[Shared]:
        """All products in one round of openings."""
        triples = [self.provider.mul(x.shape).take() for x, _ in pairs]
        return self._beaver("mul", pairs, triples, truncate)

    def matmul_many(self, pairs: list[tuple[Shared, Shared]], truncate: bool = True) -> list[Shared]:
        triples = [self.provider.matmul(x.shape, y.shape).take() for x, y in pairs]
        return self._beaver("matmul", pairs, triples, truncate)

    def _beaver(self, kind, pairs, triples, truncate) -> list[Shared]:
        masked = []
        for (x, y), t in zip(pairs, triples):
            masked += [Shared(x.c - t.a[0], x.s - t.a[1]), Shared(y.c - t.b[0], y.s - t.b[1])]
        opened = self.open(masked)
        out = []
        for i, t in enumerate(triples):
            z = Shared(*beaver.beaver_combine(kind, t, opened[2 * i], opened[2 * i + 1]))
            out.append(self.trunc(z, self.f) if truncate else z)
        return out

    def mul(self, x: Shared, y: Shared) -> Shared:
        return self.mul_many([(x, y)])[0]

    def square(self, x: Shared) -> Shared:
        return self.mul(x, x)

    # -- nonlinear functions --------------------------------------------------------------------
    def exp(self, x: Shared, n: int = 8) -> Shared:
        """``exp(x)`` as ``(p(x/2^n))^(2^n)``, p the cubic Taylor polynomial: 2 + n rounds."""
        u = self.trunc(x, n)  # x / 2^n (exact shift of the fixed point)
        u2 = self.square(u)
        u3 = self.mul(u2, u)
        y = self.add_public(u + self.mul_public(u2, 0.5) + self.mul_public(u3, 1 / 6), 1.0)
        for _ in range(n):
            y = self.square(y)
        return y

    def reciprocal(self, x: Shared, iters: int = 14) -> Shared:
        """``1/x`` for x in [0.01, 500]: Newton from ``3 exp(0.5 - x) + 0.003``."""
        y = self.add_public(self.mul_public(self.exp(self.add_public(-x, 0.5)), 3.0), 0.003)
        for _ in range(iters):
            xy = self.mul(x, y)
            y = self.mul(y, self.add_public(-xy, 2.0))
        return y

    def rsqrt(self, x: Shared, lo: float, hi: float, iters: int | None = None) -> Shared:
        """``1/sqrt(x)`` for x in [lo, hi]: Newton from the constant ``1/sqrt(hi)``."""
        if iters is None:  # ~1.5x growth per step while far below, then quadratic
            iters = math.ceil(math.log(math.sqrt(hi / lo)) / math.log(1.5)) + 5
        y = self.add_public(Shared(torch.zeros_like(x.c), torch.zeros_like(x.s)), 1 / math.sqrt(hi))
        for _ in range(iters):
            xy2 = self.mul(self.mul(x, y), y)  # (x y) y: y^2 alone has too few bits when y is small
            y = self.mul(y, self.mul_public(self.add_public(-xy2, 3.0), 0.5))
        return y

    def sigmoid(self, x: Shared) -> Shared:
        """x in [-16, 16]: ``e^{x/2} / (e^{x/2} + e^{-x/2})`` with the denominator scaled into
        the reciprocal's range."""
        h = self.trunc(x, 1)
        both = self.exp(cat([h, -h], 0))
        ep, em = both.map(lambda t: t[:h.shape[0]]), both.map(lambda t: t[h.shape[0]:])
        d = self.mul_public(ep + em, 1 / 32)  # [2, 6000] -> [1/16, 190]
        return self.mul_public(self.mul(ep, self.reciprocal(d)), 1 / 32)

    def silu(self, x: Shared) -> Shared:
        return self.mul(x, self.sigmoid(x))

    def gelu_tanh(self, x: Shared) -> Shared:
        x3 = self.mul(self.square(x), x)
        z = self.mul_public(x + self.mul_public(x3, 0.044715), 2 * math.sqrt(2 / math.pi))
        # 0.5 x (1 + tanh(z/2)) = x sigmoid(z)
        return self.mul(x, self.sigmoid(z))

    def softmax(self, x: Shared, mask: torch.Tensor | None = None, shift: float = 0.0) -> Shared:
        """Softmax over the last dim. ``mask``: public 0/1 (1 = allowed) of x's shape."""
        n = x.shape[-1]
        if mask is not None:  # mean over the allowed entries only, masked ones set to the mean
            cnt = mask.sum(-1, keepdim=True).to(torch.float64)
            xm = self.mul_int(x, mask.to(torch.int64))
            mean = self.mul_public(xm.sum(-1, keepdim=True), 1 / cnt)
        else:
            mean = self.mul_public(x.sum(-1, keepdim=True), 1 / n)
        centred = x - mean.map(lambda t: t.expand(x.shape))
        e = self.exp(self.add_public(centred, -shift))
        if mask is not None:
            e = self.mul_int(e, mask.to(torch.int64))
        # s / n lies in [1/n, e^(max - mean - shift)]: inside the reciprocal's range for n <= 64
        # keys and centred scores up to ~6 (see the module docstring)
        cnt = mask.sum(-1, keepdim=True).to(torch.float64) if mask is not None else torch.tensor(float(n))
        r = self.mul_public(self.reciprocal(self.mul_public(e.sum(-1, keepdim=True), 1 / cnt)), 1 / cnt)
        return self.mul(e, r.map(lambda t: t.expand(x.shape)))


# -- linear layers on shares and the plan executor (simulated two parties) --------------------
WEIGHT_BITS = 20  # a row's weights encode as round(W * 2^k_j), k_j <= WEIGHT_BITS, |W_int| <= ring.WMAX


def encode_weights_pow2(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (out, in) -> (int64 weights, per-row public shifts k_j)."""
    w = w.to(torch.float64)
    peak = w.abs().amax(dim=1).clamp_min(1e-30)
    k = torch.clamp(torch.floor(torch.log2(ring.WMAX / peak)), max=WEIGHT_BITS).to(torch.int64)
    w_int = torch.round(w * torch.pow(2.0, k.to(torch.float64))[:, None]).to(torch.int64)
    return w_int.clamp_(-ring.WMAX, ring.WMAX), k


def mpc_matrices(model) -> dict[str, tuple[ring.RingMatrix, torch.Tensor]]:
    from .masked import _cached, unit_weight, units_for

    def make():
        out = {}
        for name, u in units_for(model.plan, "v3").items():
            w_int, k = encode_weights_pow2(unit_weight(u, model.weights))
            out[name] = (ring.RingMatrix(w_int), k)
        return out
    return _cached(model, ("mpc-matrices",), make)


@dataclasses.dataclass
class Ranges:
    """Public ranges the approximations are run for (a property of the model, not the prompt)."""

    # mean square of a norm's input: rsqrt is accurate (rel. err < 2e-3) for S = d * ms in
    # [d norm_lo, d norm_hi]; above, y = 1/sqrt(S) has few bits at scale 2^F (SmolLM2's
    # "massive activation" rows reach ms ~ 9e5: 2% error there)
    norm_lo: float = 1e-3
    norm_hi: float = 1e4
    softmax_shift: float = 0.0


class MPCExecutor:
    """Runs a model's plan with every activation shared (both parties simulated by ``engine``).

    Linear units are the fused v3 units; the KV cache holds shares. Only the logits are
    revealed, to the client.
    """

    def __init__(self, model, engine: Engine | None = None, ranges: Ranges | None = None):
        from ..models.reference import Reference
        from .masked import units_for

        self.model = model
        self.e = engine or Engine()
        self.ranges = ranges or Ranges()
        self.mats = mpc_matrices(model)
        self.units = units_for(model.plan, "v3")
        self.rope = Reference.of(model).rope
        self.length = 0
        self.k_cache: dict[int, Shared] = {}
        self.v_cache: dict[int, Shared] = {}

    def new_cache(self, capacity: int = 0):
        self.length = 0
        self.k_cache, self.v_cache = {}, {}

    def linear(self, ops, x: Shared) -> list[Shared]:
        key = ops[0].fuse_group if ops[0].fuse_group else ops[0].name
        W, k = self.mats[key]
        y = Shared(W.matmul(x.c), W.matmul(x.s))  # client: preprocessed W r; server: W (x - r)
        y = self.e.trunc(y, k)
        outs, at = [], 0
        for op in ops:
            part = y.map(lambda t: t[:, at:at + op.out_dim])
            at += op.out_dim
            if op.bias:
                part = self.e.add_public(part, self.model.weights[op.bias].to(torch.float64))
            outs.append(part)
        return outs

    def norm(self, step, x: Shared) -> Shared:
        """RMSNorm / LayerNorm on shares. ``S = sum x^2`` is formed from ``x / 2^8`` squared without
        truncation (scale 2^2F) and summed before one truncation by ``F - 16`` bits, so elements up
        to ~2^14 neither overflow the ring nor lose small rows' precision; ``1/sqrt(d)`` is folded
        into the public weight: ``x rsqrt(mean x^2 + eps) = sqrt(d) x rsqrt(S + d eps)``."""
        e, w = self.e, self.model.weights
        d = x.shape[-1]
        if step.kind == "layer":
            x = x - e.mul_public(x.sum(-1, keepdim=True), 1 / d).map(lambda t: t.expand(x.shape))
        xs = e.trunc(x, 8)
        (sq,) = e.mul_many([(xs, xs)], truncate=False)
        S = e.add_public(e.trunc(sq.sum(-1, keepdim=True), e.f - 16), d * step.eps)
        r = e.rsqrt(S, d * self.ranges.norm_lo, d * self.ranges.norm_hi)
        y = e.mul(x, r.map(lambda t: t.expand(x.shape)))
        y = e.mul_public(y, w[step.weight].to(torch.float64) * math.sqrt(d))
        if step.bias:
            y = e.add_public(y, w[step.bias].to(torch.float64))
        return y

    def attention(self, step, q: Shared, k: Shared, v: Shared) -> Shared:
        e = self.e
        T, start = q.shape[0], self.length
        end = start + T
        H, KV, D = step.n_heads, step.n_kv_heads, step.head_dim
        q = q.map(lambda t: t.view(T, H, D).transpose(0, 1))
        k = k.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        v = v.map(lambda t: t.view(T, KV, D).transpose(0, 1))
        if step.rope:
            cos, sin = (t.to(torch.float64) for t in self.rope.tables(start, end))
            half = D // 2

            def rot(s: Shared) -> Shared:
                return s.map(lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1))

            q = e.mul_public(q, cos) + e.mul_public(rot(q), sin)
            k = e.mul_public(k, cos) + e.mul_public(rot(k), sin)
        if step.layer in self.k_cache:
            k = cat([self.k_cache[step.layer], k], 1)
            v = cat([self.v_cache[step.layer], v], 1)
        self.k_cache[step.layer], self.v_cache[step.layer] = k, v
        group = H // KV
        q = q.map(lambda t: t.reshape(KV, group * T, D))
        (scores,) = e.matmul_many([(q, k.map(lambda t: t.transpose(1, 2)))])
        scores = e.mul_public(scores, 1 / math.sqrt(D))
        kpos = torch.arange(end)[None, :]
        qpos = torch.arange(start, end)[:, None]
        allowed = kpos <= qpos
        window = self.model.config.sliding_window
        if window is not None:
            allowed &= kpos > qpos - window
        mask = allowed[None].expand(group, T, end).reshape(group * T, end)[None].expand(KV, group * T, end)
        probs = e.softmax(scores, mask=mask, shift=self.ranges.softmax_shift)
        (out,) = e.matmul_many([(probs, v)])
        return out.map(lambda t: t.reshape(H, T, D).transpose(0, 1).reshape(T, H * D))

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Logits (1, vocab) of the last position, revealed to the client."""
        from ..models.plan import Activation, Add, Attention, Embed, Linear, Norm

        plan, w, e = self.model.plan, self.model.weights, self.e
        ids_t = torch.tensor(ids, dtype=torch.long)
        env: dict[str, Shared] = {}
        steps = plan.steps
        i = 0
        while i < len(steps):
            step = steps[i]
            if i == plan.head_start:
                env[step.inp] = env[step.inp].map(lambda t: t[-1:])
            if isinstance(step, Linear):
                ops = [step]
                while step.fuse_group and i + len(ops) < len(steps) and \
                        getattr(steps[i + len(ops)], "fuse_group", None) == step.fuse_group:
                    ops.append(steps[i + len(ops)])
                for op, out in zip(ops, self.linear(tuple(ops), env[step.inp])):
                    env[op.out] = out
                i += len(ops)
                continue
            if isinstance(step, Embed):  # the client's own input, shared
                x = torch.nn.functional.embedding(ids_t, w[step.weight]).to(torch.float64)
                if step.pos_weight:
                    x = x + w[step.pos_weight][self.length:self.length + len(ids)]
                env[step.out] = e.share(x)
            elif isinstance(step, Norm):
                env[step.out] = self.norm(step, env[step.inp])
            elif isinstance(step, Attention):
                env[step.out] = self.attention(step, env[step.q], env[step.k], env[step.v])
            elif isinstance(step, Add):
                env[step.out] = env[step.inputs[0]] + env[step.inputs[1]]
            elif isinstance(step, Activation):
                if step.kind == "silu_gate":
                    env[step.out] = e.mul(e.silu(env[step.inputs[0]]), env[step.inputs[1]])
                else:
                    env[step.out] = e.gelu_tanh(env[step.inputs[0]])
            else:
                raise TypeError(f"not a plan step: {step!r}")
            i += 1
        self.length += len(ids)
        return e.reveal(env["logits"]).to(torch.float32)
