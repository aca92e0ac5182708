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

Several tokens per round: party/speculative (``--draft lookup|jacobi --draft-len K``, and the
older ``--jacobi-block B``, which is ``--draft lookup --draft-len B-1``) sends K+1 rows per decode
forward and crops what is not accepted from both KV caches: the client truncates its own
(:meth:`SplitClient.rollback`), the server crops at the next request's ``start``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..models.executor import forward_steps, run_sync
from ..models.reference import Reference
from ..wire.errors import ConnectionClosed, ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from ..wire.schema import Int, IntList, Schema, Tensor

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
        self.session.charge("split rows", h.shape[0])  # rollbacks do not buy unbounded forwards
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
    def __init__(self, channel, model, *, split_layers: int = 2):
        self.channel = channel
        self.model = model
        self.k = int(split_layers)
        self.L = model.config.n_layers
        self.server_layers = server_range(self.L, self.k)
        self.ref = Reference.of(model)
        self.cache = None
        self.timings: dict[str, float] = {}
        self.offline_ms = 0.0

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

    async def _rows(self, ids: list[int], all_logits: bool) -> torch.Tensor:
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
        return (await self._rows(ids, all_logits=False))[-1]

    async def forward_rows(self, ids: list[int]) -> torch.Tensor:
        return await self._rows(ids, all_logits=True)

    def rollback(self, length: int) -> None:
        """Drop positions from ``length`` on; the server crops its cache at the next request's start."""
        self.cache.truncate(length)


def server_handler(spec, session) -> "SplitServerHandler":
    return SplitServerHandler(session)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           split_layers: int, draft: str, draft_len: int, jacobi_block: int, jacobi_iters: int | None) -> SplitClient:
    """The drafting options are party/run's (party/speculative drives the forwards)."""
    return SplitClient(channel, model, split_layers=split_layers)
