"""v3-cc on the wire: the server's handler (a courier of ciphertext) and the client.

Session, after HELLO:

1. ``CC_ATTEST {nonce, client_key}``: a fresh 32-byte nonce and the client's ephemeral X25519
   public key. ``CC_REPORT {report, signature, signer}``: the enclave's signed report.
   The client verifies it (attestation.verify_report) and refuses, naming the failed check,
   before anything private leaves it.
2. Per forward (the prompt, then each generated token: one round per token):
   ``CC_SEALED {n, ct}`` -> ``CC_SEALED_OK {n, ct}``, ``ct`` a uint8 vector of
   XChaCha20-Poly1305 ciphertext, ``n`` its counter.

The server's view: the nonce and public keys, then counters and ciphertexts whose lengths
reveal the number of tokens per forward (as every protocol here does) and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

from ...wire.errors import ErrorCode, ProtocolError
from ...wire.msgtypes import MsgType
from ..registry import ProtocolSpec, register
from . import SIMULATED_NOTE, aead
from .attestation import (NONCE_BYTES, FRESHNESS_WINDOW_S, AttestationError, SignedReport, local_components,
                          make_report, measurement_of, parse_trust, verify_report)
from .enclave import REQ_FORWARD, RESP_LOGITS, Enclave
from .provider import Provider, ProviderUnavailable, get_provider


# -- server ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ServerCC:
    """Per server process: the provider (its signing key) and the measured components."""

    provider: Provider
    components: dict

    def describe(self) -> dict:
        return {**self.provider.describe(), "measurement": measurement_of(self.components),
                "components": dict(self.components)}


def server_cc(server) -> ServerCC:
    st = server.__dict__.get("_cc")
    if st is None:
        provider = get_provider(getattr(server.config, "cc_provider", "software") or "software",
                                getattr(server.config, "cc_key", None))
        st = server.__dict__["_cc"] = ServerCC(provider, local_components(server.model.fingerprint()))
    return st


def server_info(server, request: dict) -> dict:
    """What ``shardlm info`` shows under v3-cc; with ``cc_nonce`` in the request, a fresh report
    signed over it (with a throwaway enclave key: it opens no session)."""
    st = server_cc(server)
    out = st.describe()
    nonce = request.get("cc_nonce")
    if isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES:
        pk, _ = aead.keypair()
        out["report"] = make_report(st.provider, components=st.components, enclave_key=pk,
                                    client_key=bytes(32), nonce=nonce, session_id="info").as_body()
    return {"cc": out}


def _bytes_field(body: dict, name: str, size: int) -> bytes:
    v = body.get(name)
    if not isinstance(v, bytes) or len(v) != size:
        raise ProtocolError(ErrorCode.MALFORMED, f"'{name}' must be {size} bytes")
    return v


class CCServerHandler:
    """Moves ciphertext between the channel and the enclave; never sees a plaintext."""

    message_types = frozenset({MsgType.CC_ATTEST, MsgType.CC_SEALED})

    def __init__(self, session):
        self.session = session
        try:
            st = server_cc(session.server)
        except ProviderUnavailable as exc:
            raise ProtocolError(ErrorCode.INTERNAL, str(exc)) from None
        self.enclave = Enclave(st.provider, session.server.model, st.components, session.session_id,
                               session.max_seq_len)

    async def handle(self, msg) -> None:
        body, channel = msg.body, self.session.channel
        if msg.type == MsgType.CC_ATTEST:
            if set(body) != {"nonce", "client_key"}:
                raise ProtocolError(ErrorCode.MALFORMED, f"CC_ATTEST takes exactly 'nonce' and 'client_key', "
                                                         f"got {sorted(body)}")
            report = self.enclave.attest(_bytes_field(body, "nonce", NONCE_BYTES), _bytes_field(body, "client_key", 32))
            await channel.send(MsgType.CC_REPORT, report.as_body())
            return
        if set(body) != {"n", "ct"}:
            raise ProtocolError(ErrorCode.MALFORMED, f"CC_SEALED takes exactly 'n' and 'ct', got {sorted(body)}")
        ct = body["ct"]
        if not isinstance(ct, np.ndarray) or ct.dtype != np.uint8 or ct.ndim != 1:
            raise ProtocolError(ErrorCode.MALFORMED, "'ct' must be a uint8 vector of ciphertext")
        n, out = self.enclave.call(body["n"], ct.tobytes())
        await channel.send(MsgType.CC_SEALED_OK, {"n": n, "ct": np.frombuffer(out, dtype=np.uint8)})


# -- client ----------------------------------------------------------------------------------------
class CCClient:
    """Attests the server (``setup``), then seals each forward for the enclave."""

    def __init__(self, channel, model, *, cc_trust: str | None = None, cc_window: float | None = None,
                 **_options):
        self.channel = channel
        self.model = model
        self.pin = parse_trust(cc_trust) if cc_trust else None
        self.window = FRESHNESS_WINDOW_S if cc_window is None else float(cc_window)
        self.timings: dict[str, float] = {}
        self.offline_ms = 0.0
        self.notes: list[str] = []
        self.report: dict | None = None
        self.sealed: aead.SealedChannel | None = None

    async def setup(self) -> None:
        t0 = time.perf_counter()
        expected = local_components(self.model.fingerprint())
        if self.pin is None:  # refuse before sending even the nonce
            verify_report(None, pin=None, nonce=b"", client_key=b"", expected=expected)
        nonce = os.urandom(NONCE_BYTES)
        pk, sk = aead.keypair()
        reply = await self.channel.request(MsgType.CC_ATTEST, {"nonce": nonce, "client_key": pk}, MsgType.CC_REPORT)
        fields = verify_report(SignedReport.from_body(reply), pin=self.pin, nonce=nonce, client_key=pk,
                               expected=expected, window=self.window)
        self.report = fields
        if fields.get("simulated", True):
            self.notes.append(f"v3-cc provider '{fields.get('provider')}': {SIMULATED_NOTE}")
        self.sealed = aead.SealedChannel.client(pk, sk, fields["enclave_key"], fields["session_id"])
        self.offline_ms = (time.perf_counter() - t0) * 1e3

    def new_cache(self, capacity: int) -> None:
        pass  # the enclave holds the cache

    def seal_forward(self, ids: list[int]) -> dict:
        if self.sealed is None:
            raise AttestationError("order", "forward before attestation")
        n, ct = self.sealed.seal(REQ_FORWARD + np.asarray(ids, dtype="<i8").tobytes())
        return {"n": n, "ct": np.frombuffer(ct, dtype=np.uint8)}

    async def forward(self, ids: list[int]) -> torch.Tensor:
        reply = await self.channel.request(MsgType.CC_SEALED, self.seal_forward(ids), MsgType.CC_SEALED_OK)
        ct = reply.get("ct")
        if not isinstance(ct, np.ndarray) or ct.dtype != np.uint8:
            raise ProtocolError(ErrorCode.MALFORMED, "server returned a malformed sealed response")
        pt = self.sealed.open(reply.get("n"), ct.tobytes())
        vocab = self.model.config.vocab
        if pt[:1] != RESP_LOGITS or len(pt) != 1 + 4 * vocab:
            raise ProtocolError(ErrorCode.MALFORMED, "the enclave's response is not a logits vector")
        return torch.from_numpy(np.frombuffer(pt, dtype="<f4", offset=1).astype(np.float32))


register(ProtocolSpec(
    name="v3-cc", private=True, needs_model=True, server_handler=CCServerHandler, client_factory=CCClient,
    server_info=server_info,
    summary="whole model inside an attested enclave boundary (signed report over the client's nonce; "
            "X25519 + XChaCha20-Poly1305 channel), 1 round/token; with the software provider: "
            + SIMULATED_NOTE,
))
