"""v3-cc: exactness, the server's view (ciphertext only), and every refusal (DESIGN.md s6)."""
import json
import math
import os
import shutil
import time

import nacl.signing
import numpy as np
import pytest
import torch
import trio

from conftest import load_tiny_models
from shardlm.models.reference import Reference, generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.protocols import registry
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols.cc import SIMULATED_NOTE, aead, attestation, provider
from shardlm.protocols.cc.enclave import Enclave
from shardlm.protocols.cc.service import CCClient, server_cc
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import tls_server

GREEDY = SamplingParams()
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, ("llama", "gpt2"), 5)


@pytest.fixture(scope="module")
def cc_key(tmp_path_factory):
    """A software provider key file for these tests (never the user's $SHARDLM_HOME key)."""
    path = tmp_path_factory.mktemp("cc") / "key"
    path.write_text(os.urandom(32).hex())
    return str(path), provider.SoftwareProvider.load(path).fingerprint


def _server(tmp_path, model, cc_key, **cfg):
    return tls_server(tmp_path, model=model, cc_key=cc_key[0], **cfg)


async def _gen(cfg, model, prompt, n, trust):
    return await run_generation(cfg, model, registry.get("v3-cc"), prompt, n, GREEDY, ignore_eos=True,
                                options={"cc_trust": trust})


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_equals_the_reference_one_round_per_token(tiny, tmp_path, cc_key, family):
    model = tiny[family]
    prompt = [5, 77, 31, 200, 9, 14, 150]

    async def main():
        async with _server(tmp_path, model, cc_key) as (server, cfg):
            return await _gen(cfg, model, prompt, 20, cc_key[1])

    rep = trio.run(main)
    assert rep.result.token_ids == reference_generate(model, prompt, 20, GREEDY, stop_ids=())
    assert rep.stats["prefill"]["rounds"] == 1 and rep.stats["decode"]["rounds"] == 19
    assert rep.notes == [f"v3-cc provider 'software': {SIMULATED_NOTE}"]
    assert rep.as_dict()["notes"] == rep.notes and rep.private


# -- the server's view ----------------------------------------------------------------------------
def _chi2_ok(data: np.ndarray) -> float:
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    return ((counts - expected) ** 2 / expected).sum()


def test_server_view_holds_only_ciphertext(tiny, tmp_path, cc_key, monkeypatch):
    model = tiny["llama"]
    rec = tmp_path / "rec"
    prompts = [list(range(3, 27)), [250, 1, 1, 1] * 6]  # same length, different tokens
    handed_out = []  # what the server's handler got back from the enclave (it sends it on)
    orig_call = Enclave.call

    def spy(self, counter, ct):
        n, out = orig_call(self, counter, ct)
        handed_out.append(out)
        return n, out

    monkeypatch.setattr(Enclave, "call", spy)

    async def main():
        async with _server(tmp_path, model, cc_key, record_dir=str(rec)) as (server, cfg):
            for p in prompts:
                await _gen(cfg, model, p, 36, cc_key[1])
            # plain over the same server, as a control for the byte search below
            await run_generation(cfg, model, registry.get("plain"), prompts[0], 2, GREEDY, ignore_eos=True)

    trio.run(main)
    dirs = session_dirs(rec)
    views = [load_transcript(d)[1] for d in dirs[:2]]

    # (1) structure: same types, fields, sizes for two different prompts of the same length
    def shape_of(msgs):
        return [(m.type, sorted(m.body), m.frame_bytes) for m in msgs]
    assert shape_of(views[0]) == shape_of(views[1])
    # (3) no path for plaintext: the handshake, public key material, then counters and ciphertexts
    for msgs in views:
        assert [m.type for m in msgs[:2]] == [MsgType.HELLO, MsgType.CC_ATTEST]
        assert {m.type for m in msgs[2:]} == {MsgType.CC_SEALED, MsgType.BYE}
        attest = msgs[1].body
        assert set(attest) == {"nonce", "client_key"} and all(len(v) == 32 for v in attest.values())
        sealed = [m for m in msgs if m.type == MsgType.CC_SEALED]
        assert [m.body["n"] for m in sealed] == list(range(36))
        for m in sealed:
            assert set(m.body) == {"n", "ct"} and m.body["ct"].dtype == np.uint8
    raw = [(d / "frames.bin").read_bytes() for d in dirs]
    needle = np.asarray(prompts[0][:6], dtype="<i8").tobytes()
    assert needle in raw[2]  # plain: the prompt's ids are right there in the server's view
    assert not any(needle in r for r in raw[:2])  # v3-cc: they are not
    # (2) uniformity of the ciphertext bytes, both those the server receives and those it sends on
    received = np.frombuffer(b"".join(m.body["ct"].tobytes() for v in views for m in v
                                      if m.type == MsgType.CC_SEALED), np.uint8)
    sent = np.frombuffer(b"".join(handed_out), np.uint8)
    assert received.size > 2000 and sent.size > 80000
    for data in (received, sent):
        assert _chi2_ok(data) < 370  # 255 dof: p < 1e-6 above 370
        bits = np.unpackbits(data)
        assert abs(bits.mean() - 0.5) < 5 * 0.5 / math.sqrt(bits.size)
    # the responses' plaintext (float32 logits) is far from uniform: the test would notice it
    ref = Reference.of(model)
    logits = np.frombuffer(ref.prefill(prompts[0], ref.new_cache(64)).numpy().tobytes(), np.uint8)
    assert _chi2_ok(np.tile(logits, 80)) > 370


# -- the channel -----------------------------------------------------------------------------------
def _pair(sid="s1"):
    cpk, csk = aead.keypair()
    epk, esk = aead.keypair()
    return aead.SealedChannel.client(cpk, csk, epk, sid), aead.SealedChannel.enclave(epk, esk, cpk, sid)


def test_channel_rejects_tampering_replay_reordering_reflection_and_other_sessions():
    client, enclave = _pair()
    n, ct = client.seal(b"F" + bytes(8))
    assert enclave.open(n, ct) == b"F" + bytes(8)
    with pytest.raises(aead.ReplayError, match="replayed message: counter 0"):
        enclave.open(n, ct)
    n1, ct1 = client.seal(b"one")
    n2, ct2 = client.seal(b"two")
    with pytest.raises(aead.ReplayError, match="out-of-order message: counter 2, expected 1"):
        enclave.open(n2, ct2)
    bad = bytearray(ct1)
    bad[3] ^= 0x01
    with pytest.raises(aead.AuthError, match="failed authentication"):
        enclave.open(n1, bytes(bad))
    assert enclave.open(n1, ct1) == b"one"  # a rejected forgery does not advance the counter
    # the client's own request reflected back to it as if it were a response
    with pytest.raises(aead.AuthError):
        client.open(n, ct)
    rn, rct = enclave.seal(b"L")
    assert client.open(rn, rct) == b"L"
    # the same keys under another session id
    other = aead.SealedChannel(enclave._rx, enclave._tx, "s2", enclave=True)
    other.expected = 2
    with pytest.raises(aead.AuthError):
        other.open(n2, ct2)


# -- the client's checks on a report ----------------------------------------------------------------
def _report(prov, nonce, client_key, components, **kw):
    pk, _ = aead.keypair()
    return attestation.make_report(prov, components=components, enclave_key=pk, client_key=client_key,
                                   nonce=nonce, session_id="sid", **kw)


def test_report_checks_each_refuse_naming_the_check():
    prov = provider.SoftwareProvider(nacl.signing.SigningKey.generate())
    pin = attestation.parse_trust(prov.fingerprint)
    nonce, ck = os.urandom(32), os.urandom(32)
    comps = attestation.local_components("sha256:" + "ab" * 32)

    def check(signed, **kw):
        args = dict(pin=pin, nonce=nonce, client_key=ck, expected=comps)
        args.update(kw)
        return attestation.verify_report(signed, **args)

    good = _report(prov, nonce, ck, comps)
    assert check(good)["provider"] == "software"
    assert attestation.verify_report(good, pin=attestation.parse_trust("ed25519:" + prov.public_key.hex()),
                                     nonce=nonce, client_key=ck, expected=comps)
    cases = {
        "trust": dict(pin=None),
        "signing key": dict(pin=attestation.parse_trust("sha256:" + "00" * 32)),
        "nonce": dict(nonce=os.urandom(32)),
        "key binding": dict(client_key=os.urandom(32)),
        "measurement": dict(expected={**comps, "model": "sha256:" + "cd" * 32}),
        "session": dict(session_id="another-session"),
    }
    for name, kw in cases.items():
        with pytest.raises(attestation.AttestationError) as e:
            check(good, **kw)
        assert e.value.check == name and "refusing to send anything private" in str(e.value)
    assert check(good, session_id="sid")["session_id"] == "sid"
    with pytest.raises(attestation.AttestationError, match="model: server") as e:
        check(good, expected={**comps, "model": "sha256:" + "cd" * 32})
    # the pinned key's own signature over a report that claims hardware CC: the client, not the
    # server, decides the label, and it has no vendor evidence to verify
    class ClaimsHardware(provider.SoftwareProvider):
        name, simulated = "nvidia", False
    with pytest.raises(attestation.AttestationError) as e:
        check(_report(ClaimsHardware(prov._key), nonce, ck, comps))
    assert e.value.check == "provider evidence" and "simulated=False" in str(e.value)
    # a report signed by another key that claims to be the pinned one
    other = provider.SoftwareProvider(nacl.signing.SigningKey.generate())
    forged = _report(other, nonce, ck, comps)
    forged = attestation.SignedReport(forged.report, forged.signature, prov.public_key)
    with pytest.raises(attestation.AttestationError) as e:
        check(forged)
    assert e.value.check == "signature"
    # stale: an hour old, or from the future beyond the window
    for skew in (-3600, +3600):
        with pytest.raises(attestation.AttestationError) as e:
            check(_report(prov, nonce, ck, comps, timestamp=time.time() + skew))
        assert e.value.check == "freshness" and "freshness window" in str(e.value)
    # a measurement that is not the hash of the parts listed beside it
    f = good.fields()
    f["components"] = {**comps, "code": "sha256:" + "00" * 32}
    import msgpack
    body = msgpack.packb(dict(sorted(f.items())), use_bin_type=True)
    lying = attestation.SignedReport(body, prov.sign(attestation.DOMAIN + body), prov.public_key)
    with pytest.raises(attestation.AttestationError) as e:
        check(lying)
    assert e.value.check == "measurement"


def test_trust_pins_parse_and_bad_ones_are_explained(tmp_path):
    key = os.urandom(32)
    assert attestation.parse_trust(key.hex()) == ("key", key)
    assert attestation.parse_trust("ED25519:" + key.hex().upper()) == ("key", key)
    fp = provider.key_fingerprint(key)
    (tmp_path / "pin").write_text(fp + "\n")
    assert attestation.parse_trust(str(tmp_path / "pin")) == ("fingerprint", fp)
    with pytest.raises(ValueError, match="--cc-trust"):
        attestation.parse_trust("sha256:1234")


def test_software_key_is_persisted_and_nvidia_refuses_without_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLM_HOME", str(tmp_path))
    a = provider.get_provider("software")
    assert (tmp_path / "cc" / "software-ed25519.key").stat().st_mode & 0o777 == 0o600
    assert provider.get_provider("software").public_key == a.public_key
    assert a.unseal(a.seal(b"x")) == b"x" and a.describe()["note"] == SIMULATED_NOTE
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(provider.ProviderUnavailable) as e:
        provider.get_provider("nvidia")
    assert "nvidia-smi not found" in str(e.value) and "Not falling back" in str(e.value)
    # a fake nvidia-smi reporting CC off is refused too, naming the mode
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'CC status: OFF'\n")
    smi.chmod(0o755)
    with pytest.raises(provider.ProviderUnavailable, match="confidential-computing mode is not on"):
        provider.get_provider("nvidia")


# -- refusals end to end, and the server keeps serving ------------------------------------------------
def test_refusals_over_tls_and_the_server_keeps_serving(tiny, tmp_path, cc_key, monkeypatch):
    model = tiny["llama"]
    prompt = [5, 77, 31, 200]
    want = reference_generate(model, prompt, 6, GREEDY, stop_ids=())
    rec = tmp_path / "rec"
    orig_attest = Enclave.attest

    async def expect_refusal(cfg, check, trust=None):
        with pytest.raises(attestation.AttestationError) as e:
            await _gen(cfg, model, prompt, 6, trust or cc_key[1])
        assert e.value.check == check, e.value
        return str(e.value)

    async def sealed_session(cfg):
        """A session driven by hand: attested, then raw sealed requests."""
        conn_cm = connect(cfg)
        conn = await conn_cm.__aenter__()
        session = await conn.open_session("v3-cc", model.fingerprint(), 64)
        client = CCClient(conn.channel, model, cc_trust=cc_key[1], session_id=session["session_id"])
        await client.setup()
        return conn_cm, conn, client

    async def main():
        async with _server(tmp_path, model, cc_key, record_dir=str(rec)) as (server, cfg):
            # a tampered ciphertext fails authentication in the enclave
            cm, conn, client = await sealed_session(cfg)
            body = client.seal_forward(prompt)
            body["ct"] = body["ct"].copy()
            body["ct"][5] ^= 0x80
            with pytest.raises(RemoteError) as e:
                await conn.channel.request(MsgType.CC_SEALED, body, MsgType.CC_SEALED_OK)
            assert e.value.code == "auth_failed" and "failed authentication" in e.value.message
            await cm.__aexit__(None, None, None)
            # a replayed request is refused
            cm, conn, client = await sealed_session(cfg)
            body = client.seal_forward(prompt)
            first = await conn.channel.request(MsgType.CC_SEALED, body, MsgType.CC_SEALED_OK)
            assert first["n"] == 0
            with pytest.raises(RemoteError) as e:
                await conn.channel.request(MsgType.CC_SEALED, body, MsgType.CC_SEALED_OK)
            assert e.value.code == "replay" and "replayed message" in e.value.message
            await cm.__aexit__(None, None, None)
            # an untrusted signing key
            other = provider.key_fingerprint(os.urandom(32))
            assert other in await expect_refusal(cfg, "signing key", trust=other)
            # a stale nonce (the enclave answers an old nonce, e.g. a replayed report)
            monkeypatch.setattr(Enclave, "attest", lambda self, nonce, ck, timestamp=None:
                                orig_attest(self, bytes(32), ck, timestamp))
            await expect_refusal(cfg, "nonce")
            # a stale report (timestamp an hour ago)
            monkeypatch.setattr(Enclave, "attest", lambda self, nonce, ck, timestamp=None:
                                orig_attest(self, nonce, ck, time.time() - 3600))
            await expect_refusal(cfg, "freshness")
            monkeypatch.setattr(Enclave, "attest", orig_attest)
            # a wrong measurement: the server runs other enclave code than this client's
            st = server_cc(server)
            good = st.components
            st.components = {**good, "code": "sha256:" + "66" * 32}
            msg = await expect_refusal(cfg, "measurement")
            assert "code: server 'sha256:6666" in msg
            st.components = good
            # a report bound to another session (e.g. replayed from one)
            def other_session(self, nonce, ck, timestamp=None):
                self._session_id = "0" * 16
                return orig_attest(self, nonce, ck, timestamp)
            monkeypatch.setattr(Enclave, "attest", other_session)
            await expect_refusal(cfg, "session")
            monkeypatch.setattr(Enclave, "attest", orig_attest)
            # the server's own (pinned) key signing a claim of hardware CC it cannot back
            monkeypatch.setattr(type(st.provider), "simulated", False)
            monkeypatch.setattr(type(st.provider), "name", "nvidia")
            assert "simulated=False" in await expect_refusal(cfg, "provider evidence")
            monkeypatch.undo()
            # and the server still serves everyone
            rep = await _gen(cfg, model, prompt, 6, cc_key[1])
            assert rep.result.token_ids == want
            with trio.fail_after(10):
                while server.active:
                    await trio.sleep(0.01)

    trio.run(main)
    views = [load_transcript(d)[1] for d in session_dirs(rec)]
    assert len(views) == 9
    for msgs in views[2:8]:  # refused by the client: nothing sealed ever reached the server
        assert [m.type for m in msgs] == [MsgType.HELLO, MsgType.CC_ATTEST, MsgType.BYE]


# -- between two processes, through the CLI -----------------------------------------------------------
@pytest.fixture
def cli_server(cc_key):
    """start(model_spec) -> (listening event, a function running the client CLI against it)."""
    import contextlib
    import subprocess
    import sys

    from shardlm.party import launch

    env = {**os.environ, "SHARDLM_CC_TRUST": cc_key[1]}
    with contextlib.ExitStack() as servers:
        def start(spec):
            srv = servers.enter_context(launch.server(["-m", spec, "--threads", "1", "--cc-key", cc_key[0]]))

            def cli(*args):
                return subprocess.run([sys.executable, "-m", "shardlm.cli", *args, *srv.client_args],
                                      capture_output=True, text=True, timeout=120, env=env)
            return srv.event, cli

        yield start


def test_tiny_model_cli_two_processes_equals_the_reference(tiny, cli_server):
    model = tiny["llama"]
    event, cli = cli_server(str(model.source))
    gen = cli("generate", "-p", "hello world", "--raw", "-m", str(model.source), "--protocol", "v3-cc",
              "--max-tokens", "12", "--threads", "1", "--json")
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    assert out["token_ids"] == reference_generate(model, model.tokenizer.encode("hello world"), 12, GREEDY)
    assert SIMULATED_NOTE in out["notes"][0]


@pytest.mark.slow
def test_smollm2_cli_two_processes_equals_the_reference(smollm2, cc_key, cli_server):
    event, cli = cli_server("smollm2")
    assert event["cc"]["key_fingerprint"] == cc_key[1] and event["cc"]["simulated"]
    gen = cli("generate", "-p", "What is 2+2?", "--protocol", "v3-cc", "--max-tokens", "10", "--threads", "1",
              "--json")
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    assert out["token_ids"] == reference_generate(smollm2, ids, 10, GREEDY)
    assert out["private"] and SIMULATED_NOTE in out["notes"][0]
    info = cli("info", "--attest")
    assert info.returncode == 0, info.stderr
    assert SIMULATED_NOTE in info.stdout and "verified: signing key, signature, nonce" in info.stdout
    bad = cli("generate", "-p", "secret", "--protocol", "v3-cc", "--cc-trust", "sha256:" + "00" * 32, "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == "attestation_failed"


def test_serve_with_the_nvidia_provider_refuses_to_start_here(tiny, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PATH": os.path.dirname(sys.executable), "SHARDLM_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", "serve", "--port", "0", "-m",
                           str(tiny["llama"].source), "--cc-provider", "nvidia", "--json"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == "cc_provider" and "nvidia-smi not found" in err["error"]
    assert "Not falling back" in err["error"]


def test_the_measurement_covers_every_module_on_the_enclaves_path(tmp_path):
    """Before, six files were measured: a server could change its wire code, its connection
    handling or how it loads the model without the report changing."""
    sources = attestation.enclave_sources()
    for path in ("protocols/cc/enclave.py", "protocols/cc/aead.py", "protocols/cc/attestation.py",
                 "protocols/cc/provider.py", "protocols/cc/service.py", "models/reference.py", "models/executor.py",
                 "models/nonlinear.py", "models/load.py", "party/server.py", "party/channel.py", "wire/frames.py",
                 "wire/codec.py", "wire/schema.py"):
        assert path in sources
    root = attestation._ROOT
    copy = tmp_path / "shardlm"
    for rel in sources:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, copy / rel)
    assert attestation.code_digest(copy) == attestation.code_digest(root)
    for rel in ("wire/codec.py", "party/server.py", "models/load.py"):
        original = (copy / rel).read_bytes()
        (copy / rel).write_bytes(original + b"\n# changed\n")
        assert attestation.code_digest(copy) != attestation.code_digest(root), rel
        (copy / rel).write_bytes(original)
