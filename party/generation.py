"""The client's generation loop, the same for every protocol.

A protocol's client object provides ``new_cache(capacity)`` and ``async forward(ids) -> logits``
(of the last position); this module samples, streams, stops and times, one forward per token
(party/speculative verifies several drafted tokens per forward instead, with ``--draft``). Sampling always happens
on the client: the server never sees which token was chosen (except under ``plain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable

from ..models.sampling import SamplingParams, token_loop

# Prompt positions per prefill forward. A long prompt runs as several forwards over the KV
# cache, so what either party holds at once (mask material, a request's rows, attention
# scores) follows the chunk, not the prompt; a prompt up to this long is one forward as before.
PREFILL_CHUNK = 256


def prefill_chunks(prompt_tokens: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, int]]:
    """The (start, stop) positions of each prefill forward."""
    return [(at, min(at + chunk, prompt_tokens)) for at in range(0, prompt_tokens, chunk)]


def forwards(prompt_tokens: int, max_tokens: int) -> int:
    """Forwards one generation runs at most: the prefill's chunks, then one per decode step."""
    return len(prefill_chunks(prompt_tokens)) + max(max_tokens - 1, 0)


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    prefill_ms: float
    decode_ms: float
    total_ms: float
    embedding_ms: float
    decode_steps: int
    stop_reason: str  # "eos" | "max_tokens"
    padded_steps: int = 0    # --pad-to-max: dummy decode forwards run after the stop token
    padding_ms: float = 0.0
    drafting: dict | None = None  # speculative decoding (party/speculative): forwards, tokens per forward

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


async def prefill(client, ids: list[int], progress: Callable[[str, bool], None] | None = None):
    """Run the prompt in chunks of PREFILL_CHUNK positions; the last position's logits.
    ``progress(text, last)`` hears of each chunk of a prompt longer than one."""
    t0 = time.perf_counter()
    chunks = prefill_chunks(len(ids))
    for start, stop in chunks:
        logits = await client.forward(ids[start:stop])
        if progress is not None and len(chunks) > 1:
            left = (time.perf_counter() - t0) * (len(ids) - stop) / stop
            progress(f"prefill: {stop}/{len(ids)} prompt positions"
                     + (f", about {left:.0f} s left" if stop < len(ids) else ""), stop == len(ids))
    return logits


async def generate(client, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                   stop_ids: Iterable[int], on_token: Callable[[int], None] | None = None,
                   channel=None, pad_to_max: bool = False,
                   progress: Callable[[str, bool], None] | None = None) -> GenerationResult:
    """Prefill the prompt, then decode up to ``max_tokens`` tokens (the stop token is not kept).

    ``decode_ms`` covers the forwards after the first token: tokens/s = decode_steps / decode_ms.
    With a ``channel``, its traffic is counted under the phases "prefill" and "decode". The
    prompt goes in chunks of PREFILL_CHUNK positions; ``progress(text, last)`` hears of each
    chunk of a prompt longer than one.

    ``pad_to_max``: after a stop token, run dummy decode forwards (outputs discarded, traffic
    counted under the phase "padding") until as many forwards ran as ``max_tokens`` without a
    stop would take, so the server's view no longer says where the completion ended.
    """
    client.new_cache(len(prompt_ids) + max_tokens)
    phase = channel.phase if channel is not None else (lambda name: contextlib.nullcontext())
    loop = token_loop(prompt_ids, max_tokens, sampling, stop_ids, on_token)
    steps = 0
    t0 = t1 = time.perf_counter()
    try:
        ids = next(loop)
        with phase("prefill"):
            logits = await prefill(client, ids, progress)
        t1 = time.perf_counter()
        while True:
            ids = loop.send(logits)
            with phase("decode"):
                logits = await client.forward(ids)
            steps += 1
    except StopIteration as stop:
        out, reason = stop.value
    t2 = time.perf_counter()
    padded = max(max_tokens - 1 - steps, 0) if pad_to_max and reason == "eos" else 0
    filler = [(out or prompt_ids)[-1]]  # any id: the server sees only a masked row of its shape
    for _ in range(padded):
        with phase("padding"):
            await client.forward(filler)
    t3 = time.perf_counter()
    timings = getattr(client, "timings", {})
    return GenerationResult(
        token_ids=out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, total_ms=(t3 - t0) * 1e3,
        embedding_ms=timings.get("embed", 0.0) * 1e3, decode_steps=steps, stop_reason=reason,
        padded_steps=padded, padding_ms=(t3 - t2) * 1e3,
    )
