"""Drafting for speculative decoding (party/speculative): which drafts, how many, and the
session's row budget. No torch here: the protocol catalogue (protocols/registry) declares the
CLI options from these constants without loading a model library."""

from __future__ import annotations

import dataclasses

KINDS = ("none", "lookup", "jacobi")
MAX_DRAFT_LEN = 15  # K: at most 16 rows per decode forward (the server's per-request head limit)
DEFAULT_DRAFT_LEN = 4


@dataclasses.dataclass(frozen=True)
class Drafting:
    kind: str = "none"
    length: int = DEFAULT_DRAFT_LEN  # K, drafts per forward
    restart: int | None = None  # jacobi: iterations before the guesses start over (None: never)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--draft: {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 1 <= self.length <= MAX_DRAFT_LEN:
            raise ValueError(f"--draft-len: {self.length} is outside [1, {MAX_DRAFT_LEN}]")

    @property
    def on(self) -> bool:
        return self.kind != "none"

    @property
    def rows(self) -> int:
        """Rows per decode forward."""
        return self.length + 1 if self.on else 1

    @classmethod
    def from_options(cls, options: dict | None) -> "Drafting":
        """From a protocol's options: ``draft``, ``draft_len``; split's older ``jacobi_block`` B
        (>= 2) and ``jacobi_iters`` mean lookup drafts of B-1 tokens restarting after that many."""
        o = options or {}
        kind, length = o.get("draft") or "none", o.get("draft_len") or DEFAULT_DRAFT_LEN
        if kind == "none" and (o.get("jacobi_block") or 0) >= 2:
            kind, length = "lookup", min(o["jacobi_block"] - 1, MAX_DRAFT_LEN)
        return cls(kind, int(length), o.get("jacobi_iters"))


def decode_forwards(max_tokens: int) -> int:
    """Decode forwards at most (each commits at least one token; the first comes from the prefill)."""
    return max(max_tokens - 1, 0)


def session_rows(prompt_tokens: int, max_tokens: int, drafting: Drafting) -> int:
    """Rows per unit (and positions) a session must allow: the prompt, then ``rows`` per decode
    forward (K of them rolled back, or consumed, when rejected): prompt + max_tokens without drafts.
    HELLO's capacity bucket is made from it."""
    return prompt_tokens + max_tokens + decode_forwards(max_tokens) * (drafting.rows - 1)


def lookup(context: list[int], n: int, max_suffix: int = 3) -> list[int]:
    """Up to ``n`` tokens that followed the latest earlier occurrence of the context's last 3
    (else 2, else 1) tokens."""
    for s in range(min(max_suffix, len(context) - 1), 0, -1):
        suffix = context[-s:]
        for i in range(len(context) - s - 1, -1, -1):
            if context[i:i + s] == suffix:
                return context[i + s:i + s + n]
    return []


class Drafter:
    """The drafts of each forward, and the Jacobi guesses carried from one forward to the next."""

    def __init__(self, drafting: Drafting):
        self.d = drafting
        self.guesses: list[int] = []
        self.iters = 0

    def draft(self, context: list[int]) -> list[int]:
        k = self.d.length
        if not self.guesses or (self.d.restart is not None and self.iters >= self.d.restart):
            self.guesses, self.iters = [], 0
        drafts = lookup(context, k) if self.d.kind == "lookup" else []
        drafts += self.guesses[len(drafts):k]
        return drafts + [(drafts or context)[-1]] * (k - len(drafts))  # a fixed K+1 rows

    def update(self, logits, kept: int) -> None:
        """After a forward that kept ``kept`` drafts: the predictions of the rows after them are
        the next guesses (the Jacobi update of the unverified tail)."""
        self.guesses = logits[kept + 1:].argmax(-1).tolist()
        self.iters += 1
