"""plain: the insecure baseline. The client sends token ids in the clear, the server runs the
plaintext reference over its own per-session KV cache and returns the logits.

Never private: the server sees the prompt and every generated token. It exists to measure
every other protocol's overhead against, in the same run, over the same link.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.reference import Reference
from ..wire.errors import ErrorCode, ProtocolError
from ..wire.msgtypes import MsgType
from ..wire.schema import Schema, Tensor


PLAIN_FORWARD = Schema("PLAIN_FORWARD", ids=Tensor("int64", ((1, None),)))
PLAIN_LOGITS = Schema("PLAIN_LOGITS", logits=Tensor("float32", ("vocab",)))


class PlainServerHandler:
    message_types = frozenset({MsgType.PLAIN_FORWARD})

    def __init__(self, session):
        self.session = session
        self.ref = Reference.of(session.server.model)
        self.cache = self.ref.new_cache(64)

    async def handle(self, msg) -> None:
        ids = PLAIN_FORWARD.check(msg.body)["ids"]
        vocab = self.ref.model.config.vocab
        if ids.min() < 0 or ids.max() >= vocab:
            raise ProtocolError(ErrorCode.MALFORMED, f"token id out of range 0..{vocab - 1}")
        if self.cache.length + ids.size > self.session.max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"session would exceed max_seq_len {self.session.max_seq_len}")
        logits = (await self.session.server.compute(self.ref.forward, torch.from_numpy(ids.copy()), self.cache))[-1]
        await self.session.channel.send(MsgType.PLAIN_LOGITS, {"logits": logits.float().numpy()})


class PlainClient:
    def __init__(self, channel, model):
        self.channel = channel
        self.model = model
        self.timings: dict[str, float] = {}
        self.offline_ms = 0.0

    def new_cache(self, capacity: int) -> None:
        pass  # the server holds the cache

    async def forward(self, ids: list[int]) -> torch.Tensor:
        reply = await self.channel.request(MsgType.PLAIN_FORWARD, {"ids": np.asarray(ids, dtype=np.int64)},
                                           MsgType.PLAIN_LOGITS)
        return torch.from_numpy(PLAIN_LOGITS.check(reply, vocab=self.model.config.vocab)["logits"])



def server_handler(spec, session) -> PlainServerHandler:
    return PlainServerHandler(session)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None,
           session_id: str) -> PlainClient:
    return PlainClient(channel, model)
