"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Iterable

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 => greedy (argmax), and the other fields are ignored
    top_k: int = 0  # 0 => no limit
    top_p: float = 1.0  # 1 => no limit
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from, (vocab,): after temperature, top-k and top-p; one-hot
    at the argmax when greedy (speculative verification, party/speculative, uses it whole)."""
    logits = logits.float().reshape(-1)
    if params.greedy:
        return torch.nn.functional.one_hot(torch.argmax(logits), logits.numel()).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop = (p.cumsum(-1) - p) >= params.top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) logits vector."""
    if params.greedy:
        return int(torch.argmax(logits.float().reshape(-1)))
    return draw(probabilities(logits, params), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) probability vector (need not be normalised)."""
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


TokenLoop = Generator[list[int], torch.Tensor, tuple[list[int], str]]


def token_loop(prompt_ids: Iterable[int], max_tokens: int, params: SamplingParams, stop_ids: Iterable[int],
               on_token: Callable[[int], None] | None = None) -> TokenLoop:
    """The generation loop without the forward pass, shared by every executor.

    A generator: it yields the ids to run next (the prompt, then each new token) and is sent the
    last position's logits; it returns ``(tokens, stop_reason)`` with ``stop_reason`` "eos" or
    "max_tokens". The stop token is neither streamed to ``on_token`` nor returned.
    """
    out: list[int] = []
    if max_tokens <= 0:
        return out, "max_tokens"
    stops = set(stop_ids)
    generator = params.generator()
    logits = yield list(prompt_ids)
    while True:
        tok = sample(logits, params, generator)
        if tok in stops:
            return out, "eos"
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) >= max_tokens:
            return out, "max_tokens"
        logits = yield [tok]
