"""--offline he (issue 18): the server computes the client's W r on BFV ciphertexts (protocols/he).

Packing against a plain negacyclic product, the parameters' security bound and worst-case
noise, exact material, greedy generation equal to the reference, the server's view (only
parameters, ciphertexts and masked ring rows; no key), and bad input refused while other
sessions keep running."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import trio

from conftest import load_tiny_models
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import preprocess, registry, ring
from shardlm.protocols.he import bfv, packing, service
from shardlm.protocols.units import block_matrices, blocks, matrices_for, units_for
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import assert_uniform_below, tls_server

GREEDY = SamplingParams()
PROMPT = [5, 77, 31, 200, 9, 14, 150]
HE = {"offline_mode": "he"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, ["llama", "qwen2", "gpt2"], 3)


def _negacyclic(a, b, N, t):
    out = [0] * N
    for i, x in enumerate(int(v) for v in a):
        if x:
            for j, y in enumerate(int(v) for v in b):
                d = i + j
                out[d - N if d >= N else d] += -x * y if d >= N else x * y
    return np.array([v % t for v in out], dtype=object)


@pytest.mark.parametrize("n_in,n_out,vectors,N", [(5, 7, 3, 64), (8, 3, 5, 32), (13, 9, 2, 64), (1, 4, 1, 16),
                                                  (16, 16, 1, 32)])
def test_packing_gives_the_matrix_product_through_negacyclic_polynomial_products(n_in, n_out, vectors, N):
    rng = np.random.default_rng(n_in * 100 + n_out)
    t = 1 << 20
    p = packing.choose(n_in, n_out, vectors, N)
    assert p.k * p.m * p.n <= N
    X = rng.integers(0, t, (vectors, n_in), dtype=np.uint64)
    W = rng.integers(-50, 50, (n_out, n_in))
    xs = packing.pack_inputs(p, X)
    outs = []
    for g in range(p.groups):
        for b in range(p.out_blocks):
            acc = sum(_negacyclic(xs[g * p.in_blocks + a], packing.weight_poly(p, W, a, b, t), N, t)
                      for a in range(p.in_blocks))
            outs.append(np.array([v % t for v in acc], dtype=np.uint64))
    got = packing.unpack_outputs(p, np.stack(outs))
    assert (got.astype(object) == (X.astype(object) @ W.T.astype(object)) % t).all()


def test_parameters_are_128_bit_by_the_standard_and_fixed():
    seal = pytest.importorskip("seal")
    ctx = bfv.context()
    data = ctx.key_context_data().parms()
    assert data.poly_modulus_degree() == bfv.N == 8192
    log_q = sum(m.bit_count() for m in data.coeff_modulus())
    assert log_q == sum(bfv.COEFF_BITS) == 180 <= 218  # HomomorphicEncryption.org: N=8192 -> log q <= 218 at 128 bits
    assert seal.CoeffModulus.MaxBitCount(bfv.N, seal.sec_level_type.tc128) == 218
    assert data.plain_modulus().value() == bfv.T == 2 ** 59 and service.SHIFT == 5
    # a request's ciphertexts fit one tensor of the wire's default limits
    from shardlm.wire import frames
    assert service.MAX_CTS * bfv.CIPHERTEXT_BYTES <= frames.Limits().max_tensor_elements
    # the serialized layout compact/expand rely on: a fresh encryption has exactly that size
    assert len(bfv.Keys().encrypt(np.zeros(1, np.uint64))) == bfv.CIPHERTEXT_BYTES


def test_worst_case_operands_decrypt_exactly_with_noise_budget_left():
    """Every plaintext coefficient near t (negative weights), every mask limb at its maximum, and
    the deepest accumulation a request on SmolLM2's widest input (1536) gets: exact, with bits to spare."""
    n_out, n_in, rows = 576, 1536, 80
    W = np.where(np.arange(n_out * n_in).reshape(n_out, n_in) % 3 == 0, ring.WMAX // 8, -1).astype(np.int32)
    r = np.full((rows, n_in), -1, np.int64)  # every mask entry t - 1 mod t
    enc = service.Encryptor()
    p, cts = enc.encrypt(r, n_out)
    assert p.in_blocks >= 48 and p.cts_up <= service.MAX_CTS  # the accumulation depth this test is about
    full, _ = service.server_products(service.Block(0, 0, W), rows, cts, full=True)
    budget = min(enc.keys.noise_budget(raw.tobytes()) for raw in full)
    assert budget >= 10, budget
    # the material: W (2^5 r) mod 2^64, as the client would compute it for its online masks 2^5 r
    want = ring.RingMatrix(torch.from_numpy(W.astype(np.int64))).matmul(torch.from_numpy(r) * 32).numpy()
    out, _ = service.server_products(service.Block(0, 0, W), rows, cts)  # what the client gets: c0 trimmed
    assert out.shape[1] == service.reply_bytes(p) < 0.6 * full.shape[1]
    assert (enc.decrypt(p, out) == want).all()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("variant", ["v2", "v3", "v3-2r"])
def test_he_material_is_bit_identical_to_the_clients_own(tiny_models, family, variant):
    model = tiny_models[family]
    enc = service.Encryptor()
    matrices = matrices_for(model, variant)
    for name, unit in units_for(model.plan, variant).items():
        r = ring.mask_rows(preprocess.new_seed(), 0, 3, unit.in_dim)
        got = np.empty((3, unit.out_dim), np.int64)
        for W, (i0, ni, o0, no) in zip(block_matrices(matrices[name]), blocks(unit)):
            p, cts = enc.encrypt(r[:, i0:i0 + ni].numpy(), no)
            out, _ = service.server_products(service.Block(i0, o0, W.int_weights().numpy()), 3, cts)
            got[:, o0:o0 + no] = enc.decrypt(p, out)
        assert (got == matrices[name].matmul(r * (1 << service.SHIFT)).numpy()).all(), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("protocol", ["v3", "v3-2r"])
def test_greedy_generation_with_he_offline_equals_the_reference(tiny_models, tmp_path, family, protocol):
    model = tiny_models[family]
    want = reference_generate(model, PROMPT, 10, GREEDY, stop_ids=())

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            return await run_generation(cfg, model, registry.get(protocol), PROMPT, 10, GREEDY, ignore_eos=True,
                                        options=HE)
    rep = trio.run(main)
    assert rep.result.token_ids == want
    off = rep.as_dict()["offline"]
    assert off["mode"] == "he" and off["cts_up"] > 0 and off["server_cpu_s"] > 0 and off["client_cpu_s"] > 0
    assert rep.stats["offline"]["bytes_sent"] >= off["cts_up"] * bfv.CIPHERTEXT_BYTES


def _ct_coefficients(raw: np.ndarray) -> np.ndarray:
    """The residues a serialized ciphertext carries (its last 2 polys x 2 primes x N uint64)."""
    return raw[-2 * 2 * bfv.N * 8:].view(np.uint64)


def assert_uniform_residues(coeffs: np.ndarray) -> None:
    """Residues mod ~2^60 primes: each of the low 56 bits balanced (a packed plaintext is mostly zeros)."""
    bits = ((coeffs[:, None] >> np.arange(56, dtype=np.uint64)) & np.uint64(1)).astype(np.float64)
    tol = 6 * 0.5 / math.sqrt(coeffs.size)
    assert np.abs(bits.mean(axis=0) - 0.5).max() < tol


def test_server_view_holds_parameters_ciphertexts_and_masked_rows_only(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama"]
    rec = tmp_path / "rec"
    keys = []
    real = bfv.Keys.__init__

    def spy(self):
        real(self)
        keys.append(self)
    monkeypatch.setattr(bfv.Keys, "__init__", spy)
    prompts = [[5, 77, 31, 200, 9, 14], [250, 1, 1, 99, 42, 7]]

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
            for prompt in prompts:
                await run_generation(cfg, model, registry.get("v3"), prompt, 4, GREEDY, ignore_eos=True, options=HE)
    trio.run(main)
    views = [load_transcript(d)[1] for d in session_dirs(rec)]
    shapes = [[(m.type, tuple(sorted(m.body)), {k: getattr(v, "shape", v) for k, v in m.body.items()
                                                if k != "m" and k != "cts"}, m.frame_bytes) for m in v] for v in views]
    assert shapes[0] == shapes[1]  # structure: same types, fields, shapes and sizes for both prompts
    types = {m.type for v in views for m in v}
    assert types == {MsgType.HELLO, MsgType.HE_SETUP, MsgType.HE_PRODUCT, MsgType.MASKED_LINEAR, MsgType.BYE}
    for v in views:
        setup = [m.body for m in v if m.type == MsgType.HE_SETUP]
        assert setup == [{"params": bfv.parameters()}]  # the parameter set, no key of any kind
    secret_keys = [k.secret.to_string() for k in keys]
    for v in views:
        for m in v:
            if m.type == MsgType.HE_PRODUCT:
                assert set(m.body) == {"unit", "block", "rows", "cts"}
                blob = m.body["cts"].tobytes()
                assert not any(sk[-4096:] in blob for sk in secret_keys)
    cts = np.concatenate([_ct_coefficients(row) for v in views for m in v if m.type == MsgType.HE_PRODUCT
                          for row in m.body["cts"]])
    assert_uniform_residues(cts)
    # HE-made masks are 2^5 r': the masked rows are uniform multiples of 2^5 (a one-time pad of Z_2^59)
    ms = [m.body["m"] for v in views for m in v if m.type == MsgType.MASKED_LINEAR]
    assert all(not (x & 31).any() for x in ms)
    assert_uniform_below([x.view(np.uint64) >> np.uint64(5) for x in ms], 59)


def test_the_ciphertext_check_fails_on_unencrypted_limbs():
    """The residue check above, on a broken client that ships its packed limbs in the clear."""
    p = service.packing_for(64, 96, 6)
    polys = packing.pack_inputs(p, service.plaintext_rows(ring.mask_rows(preprocess.new_seed(), 0, 6, 64).numpy()))
    leaked = np.concatenate([polys.reshape(-1), polys.reshape(-1)])
    with pytest.raises(AssertionError):
        assert_uniform_residues(leaked)
    enc = service.Encryptor()
    _, cts = enc.encrypt(ring.mask_rows(preprocess.new_seed(), 0, 6, 64).numpy(), 96)
    assert_uniform_residues(np.concatenate([_ct_coefficients(row) for row in cts]))
    # and the masked-row check: uniform 59-bit values pass, a stuck bit or a 60th bit does not
    u = ring.mask_rows(preprocess.new_seed(), 0, 64, 576).numpy().view(np.uint64) >> np.uint64(5)
    assert_uniform_below([u], 59)
    for broken in (u & ~np.uint64(1 << 30), u | np.uint64(1 << 59)):
        with pytest.raises(AssertionError):
            assert_uniform_below([broken], 59)


async def _he_session(cfg, model, capacity=64):
    conn_cm = connect(cfg)
    conn = await conn_cm.__aenter__()
    await conn.open_session("v3", model.fingerprint(), capacity)
    return conn_cm, conn


def test_bad_he_input_is_refused_clearly_and_other_sessions_keep_running(tiny_models, tmp_path):
    model = tiny_models["llama"]
    unit = next(iter(units_for(model.plan, "v3").values()))
    _, ni, _, no = blocks(unit)[0]
    enc = service.Encryptor()
    p, good = enc.encrypt(ring.mask_rows(preprocess.new_seed(), 0, 2, ni).numpy(), no)
    other = bfv.parameters().replace(b"\x00\x20\x00\x00", b"\x00\x10\x00\x00", 1)  # N=4096 instead of 8192
    assert other != bfv.parameters()
    garbage = np.frombuffer(np.random.default_rng(1).bytes(good.size), np.uint8).reshape(good.shape)
    cases = {
        "parameters": [(MsgType.HE_SETUP, {"params": other})],
        "before set-up": [(MsgType.HE_PRODUCT, {"unit": unit.name, "block": 0, "rows": 2, "cts": good})],
        "wrong count": [(MsgType.HE_SETUP, {"params": bfv.parameters()}),
                        (MsgType.HE_PRODUCT, {"unit": unit.name, "block": 0, "rows": 2, "cts": good[:-1]})],
        "wrong size": [(MsgType.HE_SETUP, {"params": bfv.parameters()}),
                       (MsgType.HE_PRODUCT, {"unit": unit.name, "block": 0, "rows": 2, "cts": good[:, :-8]})],
        "not a ciphertext": [(MsgType.HE_SETUP, {"params": bfv.parameters()}),
                             (MsgType.HE_PRODUCT, {"unit": unit.name, "block": 0, "rows": 2, "cts": garbage})],
        "unknown unit": [(MsgType.HE_SETUP, {"params": bfv.parameters()}),
                         (MsgType.HE_PRODUCT, {"unit": "nope", "block": 0, "rows": 2, "cts": good})],
        "unknown block": [(MsgType.HE_SETUP, {"params": bfv.parameters()}),
                          (MsgType.HE_PRODUCT, {"unit": unit.name, "block": 1, "rows": 2, "cts": good})],
        "over budget": [(MsgType.HE_SETUP, {"params": bfv.parameters()})]
                       + [(MsgType.HE_PRODUCT, {"unit": unit.name, "block": 0, "rows": 2, "cts": good})] * 33,
    }
    want = {"parameters": "malformed", "before set-up": "wrong_state", "wrong count": "malformed",
            "wrong size": "malformed", "not a ciphertext": "malformed", "unknown unit": "malformed",
            "unknown block": "malformed", "over budget": "seq_too_long"}

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            got = {}
            for name, messages in cases.items():
                cm, conn = await _he_session(cfg, model)
                try:
                    for t, body in messages:
                        await conn.channel.send(t, body)
                        await conn.channel.recv()
                except RemoteError as exc:
                    got[name] = exc.code
                finally:
                    with trio.move_on_after(2):
                        await cm.__aexit__(None, None, None)
            rep = await run_generation(cfg, model, registry.get("v3"), PROMPT, 4, GREEDY, ignore_eos=True, options=HE)
            return got, rep
    got, rep = trio.run(main)
    assert got == want
    assert rep.result.token_ids == reference_generate(model, PROMPT, 4, GREEDY, stop_ids=())


# -- as users run it: a server process and client processes --------------------------------------
def _shardlm(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from conftest import build_tiny
    from shardlm.party import launch

    d = tmp_path_factory.mktemp("tiny-he")
    build_tiny("llama", d, seed=5)
    with launch.server(["--model", str(d), "--threads", "1"]) as srv:
        yield d, srv.client_args


def test_cli_generate_and_preprocess_with_offline_he(tiny_server, tmp_path):
    from shardlm.models.load import load_model

    d, args = tiny_server
    model = load_model(str(d))
    want = reference_generate(model, model.tokenizer.encode_chat([{"role": "user", "content": "hello"}]), 6, GREEDY)
    out = json.loads(_shardlm("generate", *args, "-m", str(d), "-p", "hello", "--max-tokens", "6", "--offline", "he",
                              "--json").stdout)
    assert out["token_ids"] == want and out["offline"]["mode"] == "he" and out["offline"]["server_cpu_s"] > 0
    info = json.loads(_shardlm("info", *args, "--json").stdout)["protocols"]["v3"]
    assert info["offline_modes"] == ["client", "he", "dealer"] and info["he"]["weight_cache_bytes"] > 0
    store = tmp_path / "store"
    pre = json.loads(_shardlm("preprocess", *args, "-m", str(d), "--tokens", "40", "--out", str(store),
                              "--offline", "he", "--json").stdout)
    assert pre["offline"]["mode"] == "he" and pre["offline"]["cts_up"] > 0
    assert json.loads((store / "meta.json").read_text())["source"] == "he"
    out = json.loads(_shardlm("generate", *args, "-m", str(d), "-p", "hello", "--max-tokens", "6", "--material",
                              str(store), "--json").stdout)
    assert out["token_ids"] == want
    both = subprocess.run([sys.executable, "-m", "shardlm.cli", "generate", *args, "-m", str(d), "-p", "hello",
                           "--max-tokens", "6", "--material", str(store), "--offline", "he"],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "give one or the other" in both.stderr


@pytest.mark.slow
def test_smollm2_v3_with_offline_he_from_an_export_client_directory_equals_the_reference(smollm2, tmp_path):
    """Two processes over TLS: the server holds SmolLM2; the client runs from an export-client
    directory, which has no linear weight matrix to read, so every W r came from the server's HE."""
    from shardlm.party import launch
    from shardlm.protocols.export import export_client

    export = tmp_path / "client"
    export_client(smollm2, export)
    prompt = "The capital of France is"
    want = reference_generate(smollm2, smollm2.tokenizer.encode_prompt(prompt, None, False), 3, GREEDY)
    with launch.server(["--model", "smollm2", "--threads", "1", "--session-ttl", "1800"]) as srv:
        out = json.loads(_shardlm("generate", *srv.client_args, "-m", str(export), "--raw", "-p", prompt,
                                  "--max-tokens", "3", "--offline", "he", "--threads", "1", "--json",
                                  timeout=1200).stdout)
    assert out["token_ids"] == want
    assert out["offline"]["mode"] == "he" and out["offline"]["server_cpu_s"] > 0
