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
from .registry import ProtocolSpec, register


class PlainServerHandler:
    message_types = frozenset({MsgType.PLAIN_FORWARD})

    def __init__(self, session):
        self.session = session
        self.ref = Reference.of(session.server.model)
        self.cache = self.ref.new_cache(64)

    async def handle(self, msg) -> None:
        ids = msg.body.get("ids")
        vocab = self.ref.model.config.vocab
        if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1 or not ids.size:
            raise ProtocolError(ErrorCode.MALFORMED, "PLAIN_FORWARD takes 'ids', a non-empty int64 vector")
        if ids.min() < 0 or ids.max() >= vocab:
            raise ProtocolError(ErrorCode.MALFORMED, f"token id out of range 0..{vocab - 1}")
        if self.cache.length + ids.size > self.session.max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"session would exceed max_seq_len {self.session.max_seq_len}")
        logits = self.ref.forward(torch.from_numpy(ids.copy()), self.cache)[-1]
        await self.session.channel.send(MsgType.PLAIN_LOGITS, {"logits": logits.float().numpy()})


class PlainClient:
    def __init__(self, channel, model, **_settings):
        self.channel = channel
        self.model = model
        self.timings: dict[str, float] = {}
        self.offline_ms = 0.0

    def new_cache(self, capacity: int) -> None:
        pass  # the server holds the cache

    async def forward(self, ids: list[int]) -> torch.Tensor:
        reply = await self.channel.request(MsgType.PLAIN_FORWARD, {"ids": np.asarray(ids, dtype=np.int64)},
                                           MsgType.PLAIN_LOGITS)
        logits = reply.get("logits")
        if not isinstance(logits, np.ndarray) or logits.shape != (self.model.config.vocab,):
            raise ProtocolError(ErrorCode.MALFORMED, "server returned malformed logits")
        return torch.from_numpy(logits)


register(ProtocolSpec(
    name="plain", private=False, needs_model=True, server_handler=PlainServerHandler, client_factory=PlainClient,
    summary="INSECURE baseline: token ids in the clear, the server runs the whole model",
))
