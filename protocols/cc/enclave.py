"""The enclave boundary: ciphertext in, ciphertext out.

:class:`Enclave` is the only object on the server that ever holds a prompt token or a logit
in the clear. Its public interface is :meth:`Enclave.attest` (public key material in, a
signed report out) and :meth:`Enclave.call` (a sealed request in, a sealed response out);
the server's handler sees nothing else. Inside: the plaintext forward of the model with the
session's own KV cache, one sealed round trip per forward (the prompt, then each token).

Plaintext formats inside the seal (version 1):

- request: ``b"F"`` + token ids as little-endian int64;
- response: ``b"L"`` + the last position's logits as little-endian float32.

Errors raised here name the rule broken, never a plaintext value.

With the ``software`` provider this "boundary" is a Python object in the server process: the
server's operator can read its memory. Only a hardware provider makes it a real one.
"""

from __future__ import annotations

import numpy as np
import torch

from ...models.reference import Reference
from ...wire.errors import ErrorCode, ProtocolError
from . import aead
from .attestation import SignedReport, make_report

REQ_FORWARD = b"F"
RESP_LOGITS = b"L"


class Enclave:
    def __init__(self, provider, model, components: dict, session_id: str, max_seq_len: int):
        self._provider = provider
        self._model = model
        self._components = dict(components)
        self._session_id = session_id
        self._max_seq_len = max_seq_len
        self._ref = Reference.of(model)
        self._cache = None
        self._channel: aead.SealedChannel | None = None

    @property
    def attested(self) -> bool:
        return self._channel is not None

    def attest(self, nonce: bytes, client_key: bytes, timestamp: float | None = None) -> SignedReport:
        """Make this session's ephemeral key pair, derive the channel keys with the client's
        public key, and return the signed report binding both keys and the client's nonce."""
        if self._channel is not None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "this session is already attested")
        pk, sk = aead.keypair()
        self._channel = aead.SealedChannel.enclave(pk, sk, client_key, self._session_id)
        del sk
        return make_report(self._provider, components=self._components, enclave_key=pk, client_key=client_key,
                           nonce=nonce, session_id=self._session_id, timestamp=timestamp)

    def call(self, counter: int, ciphertext: bytes) -> tuple[int, bytes]:
        if self._channel is None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "sealed request before attestation")
        plaintext = self._channel.open(counter, ciphertext)
        try:
            response = self._dispatch(plaintext)
        except ProtocolError:
            raise
        except Exception as exc:  # no traceback or message out of the boundary: they may quote plaintext
            raise ProtocolError(ErrorCode.INTERNAL, f"the enclave's forward failed ({type(exc).__name__})") from None
        return self._channel.seal(response)

    # -- inside ------------------------------------------------------------------------------
    def _dispatch(self, plaintext: bytes) -> bytes:
        kind, payload = plaintext[:1], plaintext[1:]
        if kind != REQ_FORWARD or not payload or len(payload) % 8:
            raise ProtocolError(ErrorCode.MALFORMED, "the enclave got a malformed request (authenticated, "
                                                     "so the client sent it)")
        ids = np.frombuffer(payload, dtype="<i8")
        vocab = self._model.config.vocab
        if ids.min() < 0 or ids.max() >= vocab:
            raise ProtocolError(ErrorCode.MALFORMED, "the enclave got a token id out of the vocabulary")
        if self._cache is None:
            self._cache = self._ref.new_cache(self._max_seq_len)
        if self._cache.length + ids.size > self._max_seq_len:
            raise ProtocolError(ErrorCode.SEQ_TOO_LONG, f"session would exceed max_seq_len {self._max_seq_len}")
        logits = self._ref.forward(torch.from_numpy(ids.astype(np.int64)), self._cache)[-1]
        return RESP_LOGITS + logits.float().cpu().numpy().astype("<f4").tobytes()
