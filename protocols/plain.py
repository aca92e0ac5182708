"""plain: the insecure baseline. The client sends token ids in the clear, the server runs the
plaintext reference over its own per-session KV cache and returns the logits.

Never private: the server sees the prompt and every generated token. It exists to measure
every other protocol's overhead against, in the same run, over the same link.

Speculative decoding (party/speculative): a forward may ask for the logits of every row
(``all_rows``) and name the position its rows start at (``start``): the server first crops its
cache there (the drafts the client did not accept). Rows are charged against the session's
capacity, so rolling back cannot buy unbounded forwards.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.reference import Reference
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from ..wire.schema import Bool, Int, Schema, Tensor


PLAIN_FORWARD = Schema("PLAIN_FORWARD", ids=Tensor("int64", ((1, None),)), start=Int(0, default=None),
                       all_rows=Bool(default=False))
# (vocab,): the last row's logits; (rows, vocab) with all_rows
PLAIN_LOGITS = Schema("PLAIN_LOGITS", logits=Tensor("float32", "shape"))


class PlainServerHandler:
    message_types = frozenset({MsgType.PLAIN_FORWARD})

    def __init__(self, session):
        self.session = session
        self.ref = Reference.of(session.server.model)
        self.cache = self.ref.new_cache(64)

    async def handle(self, msg) -> None:
        body = PLAIN_FORWARD.check(msg.body)
        ids, start = body["ids"], body["start"]
        vocab = self.ref.model.config.vocab
        if ids.min() < 0 or ids.max() >= vocab:
            raise ProtocolError(ErrorCode.MALFORMED, f"token id out of range 0..{vocab - 1}")
        if start is not None:
            if start > self.cache.length:
                raise ProtocolError(ErrorCode.WRONG_STATE, f"start {start} is beyond this session's cache of "
                                                           f"{self.cache.length} positions")
            self.cache.truncate(start)  # drafts the client did not accept
        if self.cache.length + ids.size > self.session.max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"session would exceed max_seq_len {self.session.max_seq_len}")
        self.session.charge("plain rows", int(ids.size))
        logits = await self.session.server.compute(self.ref.forward, torch.from_numpy(ids.copy()), self.cache,
                                                   body["all_rows"])
        await self.session.channel.send(MsgType.PLAIN_LOGITS,
                                        {"logits": (logits if body["all_rows"] else logits[-1]).float().numpy()})


class PlainClient:
    def __init__(self, channel, model):
        self.channel = channel
        self.model = model
        self.timings: dict[str, float] = {}
        self.offline_ms = 0.0
        self.length = 0  # positions in the server's cache, as this client counts them

    def new_cache(self, capacity: int) -> None:
        self.length = 0  # the server holds the cache

    async def forward(self, ids: list[int]) -> torch.Tensor:
        reply = await self.channel.request(MsgType.PLAIN_FORWARD, {"ids": np.asarray(ids, dtype=np.int64)},
                                           MsgType.PLAIN_LOGITS)
        self.length += len(ids)
        return torch.from_numpy(PLAIN_LOGITS.check(reply, shape=(self.model.config.vocab,))["logits"])

    async def forward_rows(self, ids: list[int]) -> torch.Tensor:
        """The logits of every row; the server first crops its cache to what this client holds."""
        body = {"ids": np.asarray(ids, dtype=np.int64), "start": self.length, "all_rows": True}
        reply = await self.channel.request(MsgType.PLAIN_FORWARD, body, MsgType.PLAIN_LOGITS)
        self.length += len(ids)
        return torch.from_numpy(PLAIN_LOGITS.check(reply, shape=(len(ids), self.model.config.vocab))["logits"])

    def rollback(self, length: int) -> None:
        self.length = length  # the server crops at the next forward_rows



def server_handler(spec, session) -> PlainServerHandler:
    return PlainServerHandler(session)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None,
           session_id: str, draft: str, draft_len: int) -> PlainClient:
    """The drafting options are party/run's (party/speculative drives the forwards)."""
    return PlainClient(channel, model)
