"""The plaintext reference: an executor of the model's plan (models/plan.py) in torch.

It is the correctness oracle for every private protocol and the engine of the `plain` baseline,
so it runs exactly the plan the protocol executors run: linear steps are `x @ W.T + b`
(`Reference.linear`), nonlinear stages are the functions of models/nonlinear.py.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import nonlinear as nl
from .config import ModelError
from .nonlinear import KVCache
from .executor import forward_steps, run_sync
from .plan import Linear
from .sampling import SamplingParams, token_loop

__all__ = ["KVCache", "Reference", "complete", "generate"]


class Reference:
    def __init__(self, model):
        self.model = model
        self.plan = model.plan
        self.w = model.weights
        self.device = next(iter(self.w.values())).device
        self.rope = nl.Rope(model.config, self.device) if model.config.uses_rope else None
        # Linear weights also kept as contiguous (in, out), made on first use: a one-row product
        # then streams the matrix in memory order, ~20% faster per decode step here (decode is
        # memory-bound). Costs a second copy of the linear weights (none if `linear` is overridden).
        self.wt: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, model) -> "Reference":
        """The model's shared Reference (built once: it holds transposed weight copies)."""
        return model.derived(("reference",), lambda: cls(model))

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.model.config, capacity, device=self.device)

    def linear(self, step: Linear, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` for one linear op. The one place weights meet activations: an executor
        that delegates the products elsewhere (a server) overrides just this."""
        wt = self.wt.get(step.weight)
        if wt is None:
            wt = self.wt[step.weight] = self.w[step.weight].t().contiguous()
        y = torch.matmul(x, wt)
        return y + self.w[step.bias] if step.bias else y

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Run the plan over T new token ids after the cache; logits (T or 1, vocab)."""
        gen = forward_steps(self.plan, self.w, ids.to(self.device), cache, self.rope, all_logits=all_logits)
        return run_sync(gen, lambda ops, x: [self.linear(op, x) for op in ops])

    def prefill(self, ids, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits of the last position (vocab,), or of every position (T, vocab)."""
        ids = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        logits = self.forward(ids, cache, all_logits)
        return logits if all_logits else logits[-1]

    def decode(self, token_id: int, cache: KVCache) -> torch.Tensor:
        return self.forward(torch.tensor([int(token_id)]), cache)[-1]


def generate(model, prompt_ids: Iterable[int], max_tokens: int, sampling: SamplingParams | None = None,
             on_token: Callable[[int], None] | None = None, stop_ids: Iterable[int] | None = None,
             reference: Reference | None = None) -> list[int]:
    """Generate up to max_tokens after the prompt; stop at a stop id (default: the model's EOS ids).

    Each new token is passed to `on_token` as soon as it is chosen (streaming). The stop token
    itself is neither streamed nor returned.
    """
    ref = reference or Reference.of(model)
    prompt = list(prompt_ids)
    cache = ref.new_cache(len(prompt) + max_tokens)
    loop = token_loop(prompt, max_tokens, sampling or SamplingParams(),
                      model.eos_ids if stop_ids is None else stop_ids, on_token)
    try:
        ids = next(loop)
        while True:
            ids = loop.send(ref.forward(torch.tensor(ids, dtype=torch.long), cache)[-1])
    except StopIteration as stop:
        return stop.value[0]


def complete(model, prompt: str, max_tokens: int, sampling: SamplingParams | None = None, *,
             chat: bool = True, system: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """Text in, text out: the prompt as a user message through the chat template (when `chat` and
    the model has one; raw text otherwise), generated with streaming text to `on_text`."""
    tok = model.tokenizer
    if tok is None:
        raise ModelError(f"{model.name}: no tokenizer, cannot generate from text")
    if chat and tok.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    else:
        ids = tok.encode(prompt)
    stream = tok.stream()
    pieces: list[str] = []

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            if on_text is not None:
                on_text(text)

    generate(model, ids, max_tokens, sampling, on_token=lambda t: emit(stream.push(t)))
    emit(stream.flush())
    return "".join(pieces)
