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
from ...wire.schema import Bytes, Int, Schema, Tensor
from . import SIMULATED_NOTE, aead
from .attestation import (NONCE_BYTES, FRESHNESS_WINDOW_S, AttestationError, SignedReport, local_components,
                          check_info_report, make_report, measurement_of, parse_trust, verify_report)
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
    def make() -> ServerCC:
        provider = get_provider(server.config.cc_provider or "software", server.config.cc_key)
        return ServerCC(provider, local_components(server.model.fingerprint()))
    return server.protocol_state("v3-cc", make)


def server_info(spec, server, request: dict) -> dict:
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


def describe_lines(cc: dict) -> list[str]:
    """v3-cc's provider, signing key and measurement as `serve` and `info` print them."""
    kind = f"{cc['provider']} provider" + (f" ({cc['note']})" if cc.get("simulated") else "")
    return [f"v3-cc: {kind}", f"  signing key {cc['key_fingerprint']} (clients pin it: --cc-trust)",
            f"  measurement {cc['measurement']}"]


async def attested_info(channel, pin: tuple[str, object] | None) -> dict:
    """``shardlm info --attest``: the server's INFO with a v3-cc report signed over a fresh nonce,
    checked here (against ``pin`` when given, else only against the key the server advertises);
    the checks passed are under ``["protocols"]["v3-cc"]["cc"]["verified"]``."""
    nonce = os.urandom(NONCE_BYTES)
    result = await channel.request(MsgType.INFO, {"cc_nonce": nonce}, MsgType.INFO_OK)
    cc = result["protocols"].get("v3-cc", {}).get("cc")
    if cc is None:
        raise ProtocolError(ErrorCode.UNKNOWN_PROTOCOL, "the server does not offer v3-cc")
    cc["verified"] = check_info_report(cc, nonce=nonce, pin=pin, model_fingerprint=result["model_fingerprint"])
    cc["report"] = {k: v.hex() for k, v in cc["report"].items()}
    return result


CC_ATTEST = Schema("CC_ATTEST", nonce=Bytes(NONCE_BYTES), client_key=Bytes(32))
CC_SEALED = Schema("CC_SEALED", n=Int(0), ct=Tensor("uint8", (None,)))
CC_SEALED_OK = Schema("CC_SEALED_OK", n=Int(0), ct=Tensor("uint8", (None,)))


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
            body = CC_ATTEST.check(body)
            report = self.enclave.attest(body["nonce"], body["client_key"])
            await channel.send(MsgType.CC_REPORT, report.as_body())
            return
        body = CC_SEALED.check(body)
        n, out = self.enclave.call(body["n"], body["ct"].tobytes())
        await channel.send(MsgType.CC_SEALED_OK, {"n": n, "ct": np.frombuffer(out, dtype=np.uint8)})


# -- client ----------------------------------------------------------------------------------------
class CCClient:
    """Attests the server (``setup``), then seals each forward for the enclave."""

    def __init__(self, channel, model, *, cc_trust: str | None = None, cc_window: float | None = None,
                 session_id: str | None = None):
        self.channel = channel
        self.session_id = session_id  # HELLO_OK's: the report must be bound to it
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
                               expected=expected, window=self.window, session_id=self.session_id)
        self.report = fields  # verify_report accepts simulated reports only: say so
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
        reply = CC_SEALED_OK.check(reply)
        pt = self.sealed.open(reply["n"], reply["ct"].tobytes())
        vocab = self.model.config.vocab
        if pt[:1] != RESP_LOGITS or len(pt) != 1 + 4 * vocab:
            raise ProtocolError(ErrorCode.MALFORMED, "the enclave's response is not a logits vector")
        return torch.from_numpy(np.frombuffer(pt, dtype="<f4", offset=1).astype(np.float32))



def server_handler(spec, session) -> CCServerHandler:
    return CCServerHandler(session)


def client(spec, channel, model, *, prompt_tokens: int, max_tokens: int, progress=None, session_id: str,
           cc_trust: str | None, cc_window: float | None) -> CCClient:
    return CCClient(channel, model, cc_trust=cc_trust, cc_window=cc_window, session_id=session_id)
