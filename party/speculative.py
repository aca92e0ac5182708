"""Speculative decoding: draft K tokens, verify them in one forward of K+1 rows.

One implementation for every protocol whose client can run several rows at once (plain, v2, v3,
v3-2r, split). Beyond generation's ``new_cache`` and ``forward``, such a client provides

- ``async forward_rows(ids) -> (T, vocab)``: the logits of every row, not just the last;
- ``rollback(length)``: drop its KV cache from position ``length`` on (the rows not accepted;
  a protocol whose server holds a cache crops it at the next request).

A decode forward runs ``[last committed token, d_1 .. d_K]``; the attention's causal mask makes
row j see the cache and rows 0..j only, so row j's logits are the model's next-token
distribution after ``d_j`` as if the drafts were committed. The drafts are verified in order
(:func:`verify`); the first rejected one ends the forward with a token drawn from the
corrected distribution, and when all K pass, row K gives one more token: each forward commits
1 .. K+1 tokens. The KV cache is rolled back to the committed positions.

Drafts (all deterministic functions of what the client already holds):

- ``lookup``: prompt lookup, the tokens that followed the latest earlier occurrence of the
  context's last 3 (else 2, else 1) tokens in prompt + output. Strong where the output copies
  the prompt (edits, code, quoting) or repeats itself. Rows it cannot fill carry the Jacobi
  guesses below (the rows are sent anyway).
- ``jacobi``: Jacobi iterations, the previous forward's argmax predictions for the rows after
  the accepted ones become the next forward's drafts (a fresh block repeats the last token);
  ``restart`` iterations after a fresh block it starts over.

Acceptance (Leviathan et al. 2023; Chen et al. 2023). With a draft distribution q and target p
(the sampling distribution after temperature / top-k / top-p, models/sampling.probabilities),
draft x is kept with probability min(1, p(x)/q(x)); on rejection a token is drawn from
norm(max(0, p - q)). Our drafts are deterministic, q is a point mass at x, so: keep x with
probability p(x); on rejection draw from p with x removed, renormalised. The output token is
then y = x with probability p(x), and y != x with probability (1 - p(x)) p(y) / (1 - p(x)) = p(y):
exactly p, at every position, so the generated sequence has the sequential distribution. Greedy
is the case p one-hot at the argmax: keep x iff it is the argmax, else take the argmax: the
output equals sequential greedy decoding token for token.

Near-tie caveat: the rows of one forward go through batched products. The masked client picks
its fixed-point fractional bits per request from max|x| over the request's rows
(MaskedClient.linear, FixedPoint.bits_for), and float kernels may sum a block of rows in a
different order than one row, so a forward of K+1 rows can round differently from one-row
forwards; a near-tie between the top two logits could then flip. Tests use prompts without such
ties.

What the server sees (README "What the server learns"): K+1 rows in every decode forward (a
fixed count, padded when there are no drafts, so the rows say nothing), but the NUMBER of
decode forwards per generated token depends on how predictable the text is: a new leak.
``pad_to_max`` hides it by running dummy forwards (of K+1 rows, rolled back) until as many ran
as the no-speculation worst case, max_tokens - 1. Rows per session grow to
prompt + (max_tokens - 1)(K+1) per unit: the session's capacity (:func:`session_rows`) and the
offline material (protocols/units.rows_needed) cover that; rejected rows are consumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable

import torch

from ..models.sampling import SamplingParams, draw, probabilities, sample
from .drafting import Drafter, Drafting, decode_forwards
from .generation import GenerationResult, prefill


def verify(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> tuple[list[int], int]:
    """The tokens one forward commits and how many drafts were kept. ``logits`` (K+1, vocab):
    row j is the distribution after draft j (row 0: after the last committed token). Point-mass
    speculative sampling (module docstring); greedy: keep while the draft is the argmax."""
    out: list[int] = []
    for j, x in enumerate(drafts):
        if params.greedy:
            best = int(torch.argmax(logits[j]))
            if x == best:
                out.append(x)
                continue
            return out + [best], j
        p = probabilities(logits[j], params)
        if float(torch.rand((), generator=generator)) < float(p[x]):
            out.append(x)
            continue
        rest = p.clone()
        rest[x] = 0.0
        return out + [draw(rest if float(rest.sum()) > 0 else p, generator)], j
    return out + [sample(logits[len(drafts)], params, generator)], len(drafts)


@dataclasses.dataclass
class DraftStats:
    kind: str
    draft_len: int
    decode_forwards: int = 0
    decode_tokens: int = 0  # tokens those forwards committed (each forward 1 .. K+1)
    drafts_kept: int = 0

    def as_dict(self) -> dict:
        f = self.decode_forwards
        return {"draft": self.kind, "draft_len": self.draft_len, "rows_per_forward": self.draft_len + 1,
                "decode_forwards": f, "decode_tokens": self.decode_tokens, "drafts_kept": self.drafts_kept,
                "tokens_per_forward": self.decode_tokens / f if f else None,
                "forwards_per_token": f / self.decode_tokens if self.decode_tokens else None}


async def generate(client, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                   stop_ids: Iterable[int], drafting: Drafting, on_token: Callable[[int], None] | None = None,
                   channel=None, pad_to_max: bool = False,
                   progress: Callable[[str, bool], None] | None = None) -> GenerationResult:
    """party/generation.generate with drafts verified K+1 rows at a time (same result fields;
    ``decode_steps`` counts tokens, ``drafting`` the forwards). ``pad_to_max``: dummy forwards
    after the end until max_tokens - 1 decode forwards ran, whatever the acceptance was."""
    rows = drafting.rows
    client.new_cache(len(prompt_ids) + max_tokens + rows)
    phase = channel.phase if channel is not None else (lambda name: contextlib.nullcontext())
    stops = set(stop_ids)
    generator = sampling.generator()
    stats = DraftStats(drafting.kind, drafting.length)
    drafter = Drafter(drafting)
    out: list[int] = []
    reason = "max_tokens"
    t0 = time.perf_counter()
    with phase("prefill"):
        logits = await prefill(client, prompt_ids, progress)
    t1 = time.perf_counter()

    def commit(tokens: list[int]) -> bool:
        """Keep ``tokens`` in order; True when generation is over."""
        nonlocal reason
        for tok in tokens:
            if tok in stops:
                reason = "eos"
                return True
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(out) >= max_tokens:
                return True
        return False

    done = max_tokens <= 0 or commit([sample(logits, sampling, generator)])
    position = len(prompt_ids)  # cache positions held: all but the last committed token
    while not done:
        drafts = drafter.draft(prompt_ids + out)
        with phase("decode"):
            logits = await client.forward_rows([out[-1]] + drafts)
        tokens, kept = verify(logits, drafts, sampling, generator)
        stats.decode_forwards += 1
        stats.drafts_kept += kept
        before = len(out)
        done = commit(tokens)
        stats.decode_tokens += len(out) - before
        position += 1 + kept
        client.rollback(position)
        drafter.update(logits, kept)
    t2 = time.perf_counter()
    padded = decode_forwards(max_tokens) - stats.decode_forwards if pad_to_max else 0
    filler = [(out or prompt_ids)[-1]] * rows  # any ids: the server sees masked rows of this shape
    for _ in range(padded):
        with phase("padding"):
            await client.forward_rows(filler)
        client.rollback(position)
    t3 = time.perf_counter()
    result = GenerationResult(
        token_ids=out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, total_ms=(t3 - t0) * 1e3,
        embedding_ms=getattr(client, "timings", {}).get("embed", 0.0) * 1e3, decode_steps=max(len(out) - 1, 0),
        stop_reason=reason, padded_steps=padded, padding_ms=(t3 - t2) * 1e3)
    result.drafting = stats.as_dict()
    return result
