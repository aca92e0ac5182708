"""split: layer-split inference (seed 004). NOT PRIVATE: the server sees hidden states.

The client runs the embedding, the first ``k`` blocks, the last ``k`` blocks, the final norm and
the LM head; the server runs blocks ``k .. L-k`` over its own per-session KV cache. Per forward
the client sends the residual stream after block ``k-1`` for the new positions (the whole prompt
in one round at prefill, one row per decode step) and gets the residual stream after block
``L-k-1`` back: one round per forward.

Why it is not private: hidden states after a few blocks of an open-weights model are an
invertible function of the tokens. ``shardlm audit`` (protocols/audit.py) recovers the prompt
from the server's recorded view; tests/test_split.py shows it. Every output that involves this
protocol says so.

KV caches on both sides: a ``SPLIT_FORWARD`` names the position its rows start at (``start``).
The server first crops its cache to ``start`` (a rollback after a Jacobi block whose tail was
not accepted), and refuses a ``start`` beyond what it holds: the two sides disagree, the
session ends with a clear error and its state is freed. The reply carries the server's new cache
length, which the client checks against its own. The server's cache is freed when the session
ends for any reason (BYE, disconnect, TTL expiry, error): see ``close`` and party/server.py.

Jacobi decoding (``jacobi_block=B``, greedy only): the client keeps guesses of the next B-1
tokens (a block), runs [last committed token, guesses] through the whole split model in one
round (the attention's causal mask over the block's rows makes row j see the cache and rows
0..j only), takes the argmax of every row, and commits the longest prefix it can verify: the
first prediction always, and prediction j+1 while guess j equals prediction j. The rest is
cropped from both KV caches (the client truncates; the server crops at the next request), and
the unverified predictions become the next guesses (the Jacobi fixed-point update), so the
block shrinks as its tokens are committed; a fresh block starts when it is used up or after
``jacobi_iters`` iterations. On a CPU every extra row costs compute, so the number of Jacobi
rows per round adapts: doubled while they verify tokens, halved (down to none, with a probe
now and then) while they do not. Where the context already holds its last few tokens earlier on,
the tokens that followed them there replace the Jacobi guesses (prompt lookup): vanilla Jacobi
iterations on a model not trained for them rarely verify more than one token per round.

The committed tokens are exactly those sequential greedy decoding would choose, up to float
rounding: a block of rows goes through batched matmuls whose results can differ from one-row
products in the last bits, so a near-tie between the top two logits could in principle flip.
The tests compare Jacobi, sequential split and the reference token for token on real prompts.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..models.executor import forward_steps, run_sync
from ..models.reference import Reference
from ..party.generation import GenerationResult, generate as sequential_generate, prefill_chunks
from ..wire.errors import ConnectionClosed, ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from ..wire.schema import Int, IntList, Schema, Tensor

PROBE_EVERY = 8  # with Jacobi rows narrowed to none, try one again every this many iterations


def server_range(n_layers: int, k: int) -> tuple[int, int]:
    """The blocks the server runs when the client keeps ``k`` at each end."""
    if not isinstance(k, int) or k < 1 or 2 * k >= n_layers:
        raise ValueError(f"--split-layers {k}: need 1 <= k and 2k < {n_layers} (the model's layers), "
                         f"so that the server runs at least one block")
    return k, n_layers - k


class KVMismatch(ProtocolError):
    def __init__(self, message: str):
        super().__init__(ErrorCode.WRONG_STATE, message)


# -- server --------------------------------------------------------------------------------------
SPLIT_OPEN = Schema("SPLIT_OPEN", layers=IntList(2))
SPLIT_FORWARD = Schema("SPLIT_FORWARD", start=Int(0), h=Tensor("float32", ((1, None), "hidden")))


class SplitServerHandler:
    message_types = frozenset({MsgType.SPLIT_OPEN, MsgType.SPLIT_FORWARD})

    def __init__(self, session):
        self.session = session
        self.model = session.server.model
        self.ref = Reference.of(self.model)
        self.layers: tuple[int, int] | None = None
        self.cache = None

    def close(self) -> None:
        """The session is over: drop its KV cache."""
        self.cache = None
        self.layers = None

    async def handle(self, msg) -> None:
        if msg.type == MsgType.SPLIT_OPEN:
            await self._open(msg.body)
        else:
            await self._forward(msg.body)

    async def _open(self, body: dict) -> None:
        if self.layers is not None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "SPLIT_OPEN twice in one session")
        layers = SPLIT_OPEN.check(body)["layers"]
        L = self.model.config.n_layers
        if not 0 < layers[0] < layers[1] < L:
            raise ProtocolError(ErrorCode.MALFORMED, f"SPLIT_OPEN takes 'layers': [a, b] with 0 < a < b < {L}")
        self.layers = (int(layers[0]), int(layers[1]))
        self.cache = self.ref.new_cache(64)
        await self.session.channel.send(MsgType.SPLIT_OPEN_OK, {
            "layers": list(self.layers), "session_ttl_secs": self.session.server.config.session_ttl})

    async def _forward(self, body: dict) -> None:
        if self.layers is None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "SPLIT_FORWARD before SPLIT_OPEN")
        body = SPLIT_FORWARD.check(body, hidden=self.model.config.hidden)
        h, start = body["h"], body["start"]
        if start > self.cache.length:
            raise KVMismatch(f"KV cache mismatch: the client continues at position {start}, but this session's "
                             f"cache holds {self.cache.length} positions; the session is closed, start a new one")
        if start + h.shape[0] > self.session.max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"session would exceed max_seq_len {self.session.max_seq_len}")
        self.cache.truncate(start)  # roll back rows the client did not accept
        out = await self.session.server.compute(self._middle, torch.from_numpy(h.copy()))
        await self.session.channel.send(MsgType.SPLIT_HIDDEN, {"h": out.numpy(), "length": self.cache.length})

    def _middle(self, h: torch.Tensor) -> torch.Tensor:
        """The server's layers over ``h`` (in a worker thread), extending this session's cache."""
        with torch.inference_mode():
            gen = forward_steps(self.model.plan, self.model.weights, None, self.cache, self.ref.rope,
                                layers=self.layers, inputs=h)
            return run_sync(gen, lambda ops, x: [self.ref.linear(op, x) for op in ops])


# -- client --------------------------------------------------------------------------------------
class SplitClient:
    def __init__(self, channel, model, *, split_layers: int = 2, jacobi_block: int | None = None,
                 jacobi_iters: int | None = None):
        self.channel = channel
        self.model = model
        self.k = int(split_layers)
        self.L = model.config.n_layers
        self.server_layers = server_range(self.L, self.k)
        if jacobi_block is not None and jacobi_block < 0:
            raise ValueError("--jacobi-block must be >= 0 (0 or 1: sequential decoding)")
        if jacobi_iters is not None and jacobi_iters < 1:
            raise ValueError("--jacobi-iters must be >= 1")
        self.jacobi_block = int(jacobi_block or 0)
        self.jacobi_iters = jacobi_iters
        self.ref = Reference.of(model)
        self.cache = None
        self.timings: dict[str, float] = {}
        self.offline_ms = 0.0
        self.jacobi_stats = {"iterations": 0, "committed": 0}

    async def setup(self) -> None:
        reply = await self.channel.request(MsgType.SPLIT_OPEN, {"layers": list(self.server_layers)},
                                           MsgType.SPLIT_OPEN_OK)
        if tuple(reply.get("layers", ())) != self.server_layers:
            raise ProtocolError(ErrorCode.MALFORMED, f"server accepted layers {reply.get('layers')}, "
                                                     f"asked for {list(self.server_layers)}")

    def new_cache(self, capacity: int):
        self.cache = self.ref.new_cache(capacity)
        return self.cache

    def _linear(self, ops, x):
        return [self.ref.linear(op, x) for op in ops]

    async def _remote(self, x: torch.Tensor, start: int) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            reply = await self.channel.request(MsgType.SPLIT_FORWARD, {"start": start, "h": x.numpy()},
                                               MsgType.SPLIT_HIDDEN)
        except ConnectionClosed as exc:
            raise ConnectionClosed(f"the server ended this split session ({exc}); its KV cache is gone (session "
                                   f"TTL, idle timeout or restart): start a new generation") from exc
        self.timings["wait"] = self.timings.get("wait", 0.0) + time.perf_counter() - t0
        h = reply.get("h")
        if not isinstance(h, np.ndarray) or h.dtype != np.float32 or h.shape != tuple(x.shape):
            raise ProtocolError(ErrorCode.MALFORMED, "server returned malformed hidden states")
        if reply.get("length") != start + x.shape[0]:
            raise KVMismatch(f"KV cache mismatch: the server's cache holds {reply.get('length')} positions, "
                             f"this client's {start + x.shape[0]}")
        return torch.from_numpy(h)

    async def forward_rows(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """One round: logits (T or 1, vocab) of the T new tokens after the cache."""
        plan, w, rope, k = self.model.plan, self.model.weights, self.ref.rope, self.k
        start = self.cache.length
        ids_t = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            x = run_sync(forward_steps(plan, w, ids_t, self.cache, rope, layers=(0, k), advance=False,
                                       timings=self.timings), self._linear)
        y = await self._remote(x.contiguous(), start)
        with torch.inference_mode():
            return run_sync(forward_steps(plan, w, None, self.cache, rope, layers=(self.L - k, self.L), inputs=y,
                                          all_logits=all_logits, timings=self.timings), self._linear)

    async def forward(self, ids: list[int]) -> torch.Tensor:
        return (await self.forward_rows(ids))[-1]

    async def generate(self, prompt_ids, max_tokens, sampling, stop_ids, on_token=None, channel=None):
        if self.jacobi_block < 2 or not sampling.greedy:
            # Jacobi verification is for greedy decoding; anything else decodes one token per round.
            return await sequential_generate(self, prompt_ids, max_tokens, sampling, stop_ids,
                                             on_token=on_token, channel=channel)
        return await self._jacobi(list(prompt_ids), max_tokens, set(stop_ids), on_token, channel)

    async def _jacobi(self, prompt_ids, max_tokens, stops, on_token, channel) -> GenerationResult:
        B, iters = self.jacobi_block, self.jacobi_iters
        phase = channel.phase if channel is not None else (lambda name: contextlib.nullcontext())
        self.new_cache(len(prompt_ids) + max_tokens + B)
        out: list[int] = []
        reason = "max_tokens"

        def commit(tok: int) -> None:
            out.append(tok)
            if on_token is not None:
                on_token(tok)

        t0 = time.perf_counter()
        with phase("prefill"):
            for start, stop in prefill_chunks(len(prompt_ids)):
                logits = await self.forward(prompt_ids[start:stop])
        t1 = time.perf_counter()
        done = max_tokens <= 0
        if not done:
            tok = int(torch.argmax(logits))
            if tok in stops:
                reason, done = "eos", True
            else:
                commit(tok)
        guesses: list[int] = []
        block_iters = 0
        width = B - 1
        while not done and len(out) < max_tokens:
            if not guesses or (iters is not None and block_iters >= iters):
                guesses, block_iters = [out[-1]] * (B - 1), 0  # a fresh block
            # guesses[i] is for the i-th token after the last committed one; prompt lookup wins
            seen = lookup_guess(prompt_ids + out, len(guesses))
            # Jacobi rows beyond the looked-up ones, as many as have been paying off lately
            extra = width if width else (1 if block_iters % PROBE_EVERY == 0 else 0)
            g = (seen + guesses[len(seen):])[:min(len(seen) + extra, max_tokens - len(out) - 1)]
            n = len(g) + 1  # rows: the last committed token + its guessed continuation
            start = self.cache.length
            with phase("decode"):
                logits = await self.forward_rows([out[-1]] + g, all_logits=True)
            preds = logits.argmax(-1).tolist()
            self.jacobi_stats["iterations"] += 1
            m = 0  # guesses verified: rows 1..m of this block hold committed tokens
            for j in range(n):
                if preds[j] in stops:
                    reason, done = "eos", True
                    break
                commit(preds[j])
                self.jacobi_stats["committed"] += 1
                if j < n - 1 and g[j] == preds[j]:
                    m += 1
                    continue
                break
            self.cache.truncate(start + 1 + m)  # the server crops at the next request
            guesses = preds[m + 1:]  # the Jacobi update of the unverified rest of the block
            block_iters += 1
            if len(g) > len(seen):  # widen while Jacobi rows verify, narrow (to 0) while they do not
                width = min(B - 1, max(1, 2 * width)) if m > len(seen) else width // 2
        t2 = time.perf_counter()
        steps = max(len(out) - 1, 0)
        return GenerationResult(token_ids=out, prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3,
                                total_ms=(t2 - t0) * 1e3, embedding_ms=self.timings.get("embed", 0.0) * 1e3,
                                decode_steps=steps, stop_reason=reason)


def lookup_guess(context: list[int], n: int, max_suffix: int = 3) -> list[int]:
    """Guesses from the context itself (prompt lookup): after the latest earlier occurrence of the
    context's last 3 (else 2, else 1) tokens, the tokens that followed it. Cheap, and a good seed
    for Jacobi iterations when the output repeats the prompt or itself; any guess is verified."""
    for s in range(min(max_suffix, len(context) - 1), 0, -1):
        suffix = context[-s:]
        for i in range(len(context) - s - 1, -1, -1):
            if context[i:i + s] == suffix:
                return context[i + s:i + s + n]
    return []


def server_handler(spec, session) -> "SplitServerHandler":
    return SplitServerHandler(session)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           split_layers: int, jacobi_block: int, jacobi_iters: int | None) -> SplitClient:
    return SplitClient(channel, model, split_layers=split_layers, jacobi_block=jacobi_block,
                       jacobi_iters=jacobi_iters)
