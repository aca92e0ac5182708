"""Inversion audit: recover the prompt tokens from a server's recorded view (``shardlm audit``).

The attacker is the server: it holds the public model and what it received (a transcript
recorded with ``serve --record-transcript``). The attack, the same for every protocol:

1. Take the first tensor the server received for the prompt, the rows of the prefill, and the
   part of the model the client ran before sending them. ``split``: the residual stream after
   blocks ``0..k-1`` (``SPLIT_FORWARD.h``, k from ``SPLIT_OPEN``). ``v2``/``v3``: the input of
   layer 0's q/k/v projection, ``attn_norm(embedding)``, read from the first ``MASKED_LINEAR``
   message by decoding its ring elements as the protocol's fixed point (as if they were the
   plaintext, scale unknown: the server has nothing better).
2. Left to right, position t: push every candidate token through that part of the model after
   the recovered prefix (one batch: each candidate row sees the prefix's KV cache and itself, at
   position t) and keep the nearest to the observed row (Euclidean distance between the rows
   scaled to unit length: the fixed-point scale of a masked view is not even known).
3. Order: candidates are tried in chunks, most likely first under the public model's own
   next-token prediction where the view gives one (for ``split``, the remaining blocks run on
   the observed rows), and the search stops at a match within float rounding
   (``EXACT_RTOL``); otherwise it goes on through the whole vocabulary.

``recovered_fraction`` is the fraction of the true prompt's positions recovered (given the true
prompt); ``chance_fraction`` is what the best constant guess (the prompt's most frequent token)
would get: a view that carries no information gives nothing better.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models import nonlinear as nl
from ..models.executor import forward_steps, run_sync
from ..models.plan import Norm
from ..models.reference import Reference
from ..party.transcript import load_transcript, session_dirs
from ..wire.msgtypes import MsgType
from .registry import PROTOCOLS

EXACT_RTOL = 1e-3  # distance between unit-length rows below which a candidate is the token
FIRST_CHUNK, MAX_CHUNK = 64, 4096  # candidates per batch: the likeliest first, then 4x more each time


class AuditError(ValueError):
    pass


@dataclasses.dataclass
class View:
    protocol: str
    session: str
    observed: torch.Tensor  # (T, hidden): the rows the server received for the prompt
    what: str
    split_layers: int | None  # split: the server's first block k; None: the layer-0 norm input


def find_session(path: str | Path) -> Path:
    """A session directory, or the newest recorded session under a transcript directory."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    if not p.is_dir():
        raise AuditError(f"{p}: no such transcript directory")
    dirs = [d for d in session_dirs(p) if (d / "index.jsonl").stat().st_size]
    if not dirs:
        raise AuditError(f"{p}: no recorded sessions")
    return dirs[-1]


def read_view(session_dir: str | Path) -> View:
    meta, msgs = load_transcript(session_dir)
    protocol = meta.get("protocol")
    sid = meta.get("session_id", Path(session_dir).name)
    if protocol == "split":
        opened = next((m for m in msgs if m.type == MsgType.SPLIT_OPEN), None)
        prefill = next((m for m in msgs if m.type == MsgType.SPLIT_FORWARD and m.body.get("start") == 0), None)
        if opened is None or prefill is None:
            raise AuditError(f"{session_dir}: a split session without SPLIT_OPEN and a prefill SPLIT_FORWARD")
        k = int(opened.body["layers"][0])
        return View(protocol, sid, torch.from_numpy(np.array(prefill.body["h"], dtype=np.float32)),
                    f"hidden states after block {k - 1} (split, k={k})", k)
    if protocol in ("v2", "v3", "v3-2r"):
        first = next((m for m in msgs if m.type == MsgType.MASKED_LINEAR), None)
        if first is None:
            raise AuditError(f"{session_dir}: a {protocol} session without MASKED_LINEAR messages")
        # read as the signed fixed-point values the server would see were they not masked (the
        # client's scale is not sent; the comparison below is scale-free anyway)
        m = torch.from_numpy(np.array(first.body["m"], dtype=np.int64))
        return View(protocol, sid, m.to(torch.float64).float(),
                    f"layer-0 q/k/v input as the server received it ({protocol}: one-time-padded ring elements)",
                    None)
    raise AuditError(f"{session_dir}: no inversion attack for protocol {protocol!r} (split, v2, v3, v3-2r)")


class Inverter:
    def __init__(self, model, view: View):
        self.model, self.view = model, view
        self.ref = Reference.of(model)
        self.plan, self.w = model.plan, model.weights

    def _lin(self, ops, x):
        return [self.ref.linear(op, x) for op in ops]

    def _run(self, ids, cache, **kw) -> torch.Tensor:
        """What the server would have received for ``ids`` after ``cache`` (k blocks, or layer-0 norm)."""
        k = self.view.split_layers
        with torch.inference_mode():
            x = run_sync(forward_steps(self.plan, self.w, torch.as_tensor(ids), cache, self.ref.rope,
                                       layers=(0, k or 0), **kw), self._lin)
            if k is None:
                norm = self.plan.steps[self.plan.layer_steps(0, 1)[0]]
                assert isinstance(norm, Norm)
                env = {norm.inp: x}
                nl.run_stage(norm, env, self.w, None, cache, None)
                x = env[norm.out]
        return x

    def _candidates(self, cache, cands: torch.Tensor) -> torch.Tensor:
        """Each candidate as the token at position cache.length, all in one batch."""
        pos, C = cache.length, cands.numel()
        mask = torch.zeros(C, pos + C, dtype=torch.bool)
        mask[:, :pos] = True
        mask[torch.arange(C), pos + torch.arange(C)] = True
        return self._run(cands, cache, advance=False, positions=torch.full((C,), pos), mask=mask)

    def prior(self) -> torch.Tensor | None:
        """(T, vocab) candidate order per position from the public model's own predictions, if the
        view allows: the blocks after k, run on the observed rows."""
        k = self.view.split_layers
        if k is None:
            return None
        L = self.model.config.n_layers
        with torch.inference_mode():
            logits = run_sync(forward_steps(self.plan, self.w, None, self.ref.new_cache(self.view.observed.shape[0]),
                                            self.ref.rope, layers=(k, L), inputs=self.view.observed,
                                            all_logits=True), self._lin)
        return torch.argsort(logits, dim=-1, descending=True)

    def invert(self, progress: Callable[[int, int], None] | None = None, max_candidates: int | None = None) -> dict:
        H = self.view.observed
        T, V = H.shape[0], self.model.config.vocab
        order = self.prior()
        cache = self.ref.new_cache(T + MAX_CHUNK)
        ids: list[int] = []
        exact = 0
        tried: list[int] = []
        for t in range(T):
            cand_order = order[t - 1] if (order is not None and t > 0) else torch.arange(V)
            target = torch.nn.functional.normalize(H[t], dim=0)
            best, best_d = -1, float("inf")
            a, size = 0, FIRST_CHUNK
            limit = min(V, max_candidates or V)
            while a < limit:
                chunk = cand_order[a:min(a + size, limit)]
                a, size = a + chunk.numel(), min(4 * size, MAX_CHUNK)
                out = self._candidates(cache, chunk)
                d = (torch.nn.functional.normalize(out, dim=1) - target).norm(dim=1)
                i = int(torch.argmin(d))

                if float(d[i]) < best_d:
                    best, best_d = int(chunk[i]), float(d[i])
                if best_d < EXACT_RTOL:
                    exact += 1
                    break
            ids.append(best)
            tried.append(a)
            self._run([best], cache)  # extend the recovered prefix's KV cache
            if progress is not None:
                progress(t + 1, T)
        return {"recovered_ids": ids, "exact_matches": exact, "candidates_tried": sum(tried),
                "candidates_per_position": tried}


def audit(model, transcript: str | Path, prompt_ids: list[int] | None = None,
          progress: Callable[[int, int], None] | None = None, max_candidates: int | None = None) -> dict:
    """Run the attack on a recorded session (or the newest under a directory); see the module doc.
    ``max_candidates`` bounds the search per position (default: the whole vocabulary)."""
    session_dir = find_session(transcript)
    view = read_view(session_dir)
    if view.observed.ndim != 2 or view.observed.shape[1] != model.config.hidden:
        raise AuditError(f"observed rows of shape {tuple(view.observed.shape)} do not fit {model.name}")
    spec = PROTOCOLS.get(view.protocol)
    t0 = time.perf_counter()
    result = Inverter(model, view).invert(progress, max_candidates)
    ids = result["recovered_ids"]
    out = {
        "session": view.session, "transcript": str(session_dir), "protocol": view.protocol,
        "private": bool(spec.private) if spec else None, "observed": view.what,
        "tokens": len(ids), **result, "max_candidates": max_candidates or model.config.vocab,
        "seconds": time.perf_counter() - t0,
    }
    if model.tokenizer is not None:
        out["recovered_text"] = model.tokenizer.decode(ids, skip_special_tokens=False)
    if prompt_ids is not None:
        n = len(prompt_ids)
        hits = sum(1 for a, b in zip(ids, prompt_ids) if a == b)
        out["prompt_tokens"] = n
        out["recovered_fraction"] = hits / n if n else 0.0
        out["chance_fraction"] = max(Counter(prompt_ids).values()) / n if n else 0.0
        if len(ids) != n:
            out["note"] = f"the view holds {len(ids)} prompt positions, the given prompt {n} tokens"
    return out
