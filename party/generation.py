"""The client's generation loop, the same for every protocol.

A protocol's client object provides ``new_cache(capacity)`` and ``async forward(ids) -> logits``
(of the last position); this module samples, streams, stops and times. Sampling always happens
on the client: the server never sees which token was chosen (except under ``plain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable

import torch

from ..models.sampling import SamplingParams, sample


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    prefill_ms: float
    decode_ms: float
    total_ms: float
    embedding_ms: float
    decode_steps: int
    stop_reason: str  # "eos" | "max_tokens"

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


async def generate(client, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                   stop_ids: Iterable[int], on_token: Callable[[int], None] | None = None,
                   channel=None) -> GenerationResult:
    """Prefill the prompt, then decode up to ``max_tokens`` tokens (the stop token is not kept).

    ``decode_ms`` covers the forwards after the first token: tokens/s = decode_steps / decode_ms.
    With a ``channel``, its traffic is counted under the phases "prefill" and "decode".
    """
    stops = set(stop_ids)
    client.new_cache(len(prompt_ids) + max_tokens)
    gen: torch.Generator = sampling.generator()
    phase = channel.phase if channel is not None else (lambda name: contextlib.nullcontext())
    t0 = time.perf_counter()
    with phase("prefill"):
        logits = await client.forward(list(prompt_ids))
    t1 = time.perf_counter()
    out: list[int] = []
    steps = 0
    reason = "max_tokens"
    while max_tokens > 0:
        tok = sample(logits, sampling, gen)
        if tok in stops:
            reason = "eos"
            break
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) >= max_tokens:
            break
        with phase("decode"):
            logits = await client.forward([tok])
        steps += 1
    t2 = time.perf_counter()
    timings = getattr(client, "timings", {})
    return GenerationResult(
        token_ids=out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, total_ms=(t2 - t0) * 1e3,
        embedding_ms=timings.get("embed", 0.0) * 1e3, decode_steps=steps, stop_reason=reason,
    )
