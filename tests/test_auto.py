"""``--protocol auto`` (protocols/auto): the cost model's exact parts (rounds and bytes per forward
from the unit shapes), its choices at the extremes, the link probe before HELLO over a simulated
link, and generations whose choice is the model's for the measured link and whose tokens are the
reference's (in process over TLS, and through the CLI against a `serve` process)."""
import dataclasses
import json
import subprocess
import sys

import pytest
import trio

from conftest import load_tiny_models
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch
from shardlm.party.client import connect
from shardlm.party.run import run_generation
from shardlm.protocols import auto, registry
from shardlm.protocols.units import units_for
from shardlm.wire import netsim

from support import tls_server

GREEDY = SamplingParams()
PROMPT = [5, 17, 33, 17, 33, 17, 33, 9]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, ["llama"], 5)["llama"]


def test_rounds_and_bytes_per_forward_follow_the_unit_shapes(model):
    L = model.config.n_layers
    for protocol, rounds in (("v3", 4 * L + 1), ("v3-2r", 2 * L + 2)):
        units = units_for(model.plan, protocol).values()
        one_row = sum(8 * (u.in_dim + u.out_dim) for u in units)
        for k in (0, 4):
            c = auto.predict(model, protocol, k, rtt=0.01, bandwidth=1e8)
            assert c.rounds == rounds
            assert c.bytes_per_forward == (k + 1) * one_row
    # narrower replies (the units' low bits) count as such
    c = auto.predict(model, "v3", 0, rtt=0.01, bandwidth=1e8, reply_bytes=lambda u: 4)
    assert c.bytes_per_forward == sum(8 * u.in_dim + 4 * u.out_dim for u in units_for(model.plan, "v3").values())


def test_tokens_per_forward_is_the_expected_accepted_run():
    assert auto.tokens_per_forward(0, 0.5) == 1.0
    assert auto.tokens_per_forward(2, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert auto.tokens_per_forward(4, 1.0) == 5.0


def test_the_choice_follows_the_link(model):
    """No round trips to save: v3 (v3-2r's products cost more). A slow link: v3-2r with drafts
    (fewer rounds, and each forward commits more than one token). The user's --draft choices bind."""
    fast, _ = auto.choose(model, rtt=0.0, bandwidth=1e12)
    assert fast.protocol == "v3"
    slow, cands = auto.choose(model, rtt=0.05, bandwidth=1e9 / 8)
    assert slow.protocol == "v3-2r" and slow.draft_len > 0
    assert [c.seconds_per_token for c in cands] == sorted(c.seconds_per_token for c in cands)
    assert len(cands) == len(auto.CANDIDATES) * len(auto.DRAFT_LENS)
    off, _ = auto.choose(model, rtt=0.05, bandwidth=1e9 / 8, lens=auto.draft_lens({"draft": "none"}))
    assert off.draft_len == 0 and off.protocol == "v3-2r"
    fixed, _ = auto.choose(model, rtt=0.05, bandwidth=1e9 / 8, lens=auto.draft_lens({"draft_len": 3}))
    assert fixed.draft_len == 3
    assert auto.options_for(slow, {"draft": "jacobi"})["draft"] == "jacobi"
    assert auto.options_for(dataclasses.replace(slow, draft_len=0), {})["draft"] == "none"


def test_the_probe_measures_a_simulated_link_before_hello(tmp_path):
    """PING is answered before HELLO; the RTT measured is the simulated one (and not far above it)
    and the bandwidth within a factor of the simulated one."""
    async def main():
        async with tls_server(tmp_path) as (server, cfg):
            cfg = dataclasses.replace(cfg, net=netsim.parse_netspec("rtt=30ms,bw=100mbit"))
            async with connect(cfg) as conn:
                link = await conn.probe_link()
                await conn.open_session("echo")  # the connection is still a fresh one
                return link

    link = trio.run(main)
    assert 0.030 <= link["rtt"] < 0.130  # loose above: the machine may be busy
    assert 100e6 / 8 / 4 < link["bandwidth"] < 100e6 / 8 * 1.5


def test_auto_generates_the_reference_with_the_choice_for_the_measured_link(model, tmp_path):
    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            cfg = dataclasses.replace(cfg, net=netsim.parse_netspec("rtt=20ms"))

            def choose(link):
                choice, cands = auto.choose(model, link["rtt"], link["bandwidth"])
                return registry.get(choice.protocol), auto.options_for(choice, {}), auto.report(choice, cands, link)
            return await run_generation(cfg, model, registry.get("v3"), PROMPT, 8, GREEDY, ignore_eos=True,
                                        choose=choose)

    rep = trio.run(main)
    assert rep.result.token_ids == reference_generate(model, PROMPT, 8, GREEDY, stop_ids=())
    out = rep.as_dict()
    link = out["auto"]["link"]
    assert link["rtt_ms"] >= 20
    want, _ = auto.choose(model, link["rtt_ms"] / 1e3, link["bandwidth_mbit"] * 1e6 / 8)
    assert (out["protocol"], out["auto"]["chose"]["protocol"]) == (want.protocol, want.protocol)
    assert out["auto"]["chose"]["draft_len"] == want.draft_len
    assert (out.get("drafting") or {}).get("draft_len", 0) == want.draft_len
    assert out["phases"]["probe"]["rounds"] == 4  # three small PINGs and the bandwidth PING


@pytest.mark.slow
def test_cli_generate_protocol_auto_against_a_serve_process(model, tmp_path):
    with launch.server(["-m", str(model.source), "--threads", "1"]) as srv:
        cmd = [sys.executable, "-m", "shardlm.cli", "generate", "-m", str(model.source), "-s", srv.address,
               "--tls-fingerprint", srv.fingerprint, "--protocol", "auto", "--raw", "-p", "hello hello hello",
               "--max-tokens", "6", "--net", "rtt=25ms", "--json"]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout)
        local = json.loads(subprocess.run(cmd[:6] + ["--raw", "-p", "hello hello hello", "--max-tokens", "6",
                                                     "--local", "--json"],
                                          capture_output=True, text=True, check=True, timeout=300).stdout)
    assert out["protocol"] in auto.CANDIDATES and out["protocol"] == out["auto"]["chose"]["protocol"]
    assert out["auto"]["link"]["rtt_ms"] >= 25 and "why" in out["auto"]
    assert out["token_ids"] == local["token_ids"]
