"""The one interpreter of a model's plan, with the linear work left to the caller.

:func:`forward_steps` is a generator: it runs every nonlinear stage itself and, at each linear
step, *yields* ``(ops, x)`` — the Linear steps to apply to input rows ``x`` (one op, or all
ops of a fuse group when ``fuse=True``) — and expects to be sent back the list of their outputs
(bias included). It returns the logits. Who computes the linear ops, and how, is the caller's
business: the plaintext reference does ``F.linear``; a private protocol's client masks ``x``
and asks the server; a test can count the calls. Because the generator never does I/O, the same
code is driven synchronously (:func:`run_sync`) or from trio (:func:`run_async`).
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable, Generator

import torch

from . import nonlinear as nl
from .nonlinear import KVCache
from .plan import Composite, Embed, Linear, Plan

# (ops, x), or with precompose=True also (Composite, (first's input, residual + first's bias))
LinearRequest = tuple[tuple[Linear, ...] | Composite, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
Forward = Generator[LinearRequest, list[torch.Tensor], torch.Tensor]


def forward_steps(plan: Plan, weights: dict[str, torch.Tensor], ids: torch.Tensor | None, cache: KVCache,
                  rope: nl.Rope | None, *, fuse: bool = False, all_logits: bool = False,
                  timings: dict[str, float] | None = None, layers: tuple[int, int] | None = None,
                  inputs: torch.Tensor | None = None, advance: bool = True,
                  positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  embedded: torch.Tensor | None = None, precompose: bool = False) -> Forward:
    """Run the plan over the T token ids after the cache; return logits (T or 1, vocab).

    ``timings`` (optional) accumulates seconds spent in the embedding and in nonlinear stages.

    A sub-range of the model (layer-split inference): ``layers=(a, b)`` runs only layers
    a..b-1, starting from the residual-stream rows ``inputs`` (T, hidden) instead of the
    embedding of ``ids`` (which runs only when ``inputs`` is None, and then ``a`` must be 0).
    The final norm and head run when ``b`` is the last layer; otherwise the residual stream
    after layer b-1 is returned. ``advance=False`` leaves ``cache.length`` alone (for a party
    that runs two ranges of the same positions over one cache). ``positions`` (T,) and ``mask``
    (T, cache.length + T; True = may attend) replace the default consecutive positions and
    causal mask (see models/nonlinear.attention).
    ``embedded`` (optional): the T embedding rows obtained elsewhere (e.g. by oblivious transfer),
    used instead of looking ``ids`` up in the table.
    ``precompose=True``: where the plan has a :class:`~.plan.Composite` (a residual linear op,
    the next norm and the group reading it), yield it as one request ``(composite, (a, res))``
    and finish the norm here from the reply (see ``Composite``); elsewhere as usual.
    """
    steps = plan.steps
    lo, hi = 0, len(steps)
    if layers is not None:
        lo, hi = plan.layer_steps(*layers)
        if layers[1] == plan.config.n_layers:
            hi = len(steps)
        if inputs is None:
            if layers[0] != 0:
                raise ValueError(f"layers {layers}: a range not starting at layer 0 needs the residual stream as inputs")
            lo = 0
    elif inputs is not None:
        raise ValueError("inputs (residual-stream rows) need a layer range")
    env: dict[str, torch.Tensor] = {}
    residual = steps[0].out
    if inputs is not None:
        env[residual] = inputs
        n = inputs.shape[0]
    elif ids is not None:
        ids = ids.reshape(-1)
        n = ids.numel()
    else:
        n = embedded.shape[0]
    extra = {} if positions is None and mask is None else {"positions": positions, "mask": mask}
    i = lo
    while i < hi:
        step = steps[i]
        if i == plan.head_start and not all_logits:
            env[step.inp] = env[step.inp][-1:]  # only the last position's logits are wanted
        if isinstance(step, Linear):
            comp = plan.composite_at(i, fuse) if precompose else None
            if comp is not None and i + 3 + len(comp.then) <= hi:
                res = env[comp.residual]
                # the request: (first's input, residual + first's bias); the reply: first's
                # output (bias included), then each `then` op's T (res + first(a)), no bias
                outs = yield comp, (env[step.inp], res + weights[step.bias] if step.bias else res)
                env[step.out] = outs[0]
                t0 = time.perf_counter()
                nl.run_stage(comp.add, env, weights, ids, cache, rope)
                for op, pre in zip(comp.then, outs[1:]):
                    env[op.out] = nl.norm_linear(pre, env[comp.add.out], comp.norm, op, weights)
                if timings is not None:
                    timings["nonlinear"] = timings.get("nonlinear", 0.0) + time.perf_counter() - t0
                i += 3 + len(comp.then)
                continue
            ops = plan.group_at(i, fuse)
            outs = yield ops, env[step.inp]
            for op, out in zip(ops, outs):
                env[op.out] = out
            i += len(ops)
            continue
        t0 = time.perf_counter()
        if isinstance(step, Embed) and embedded is not None:
            x = embedded.to(torch.float32)
            if step.pos_weight:
                x = x + weights[step.pos_weight][cache.length:cache.length + x.shape[0]]
            env[step.out] = x
        else:
            nl.run_stage(step, env, weights, ids, cache, rope, **extra)
        if timings is not None:
            key = "embed" if isinstance(step, Embed) else "nonlinear"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        i += 1
    if advance:
        cache.advance(n)
    return env["logits"] if hi == len(steps) else env[residual]


def run_sync(gen: Forward, linear: Callable[[tuple[Linear, ...], torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
    try:
        request = next(gen)
        while True:
            request = gen.send(linear(*request))
    except StopIteration as stop:
        return stop.value


async def run_async(gen: Forward,
                    linear: Callable[[tuple[Linear, ...], torch.Tensor], Awaitable[list[torch.Tensor]]]) -> torch.Tensor:
    try:
        request = next(gen)
        while True:
            request = gen.send(await linear(*request))
    except StopIteration as stop:
        return stop.value
