"""Two hosts: the server and the client in two network namespaces joined by a veth pair.

The kernel's TCP between distinct addresses (10.77.0.1 serves, 10.77.0.2 is the client), and
the same through `netsim-proxy` at 20 ms RTT: the protocols do not know they share a machine.
Needs root and iproute2 (`ip netns`); skips with the reason where namespaces cannot be made.
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import build_tiny
from shardlm.models.load import load_model
from shardlm.models.reference import generate
from shardlm.models.sampling import SamplingParams
from shardlm.party import launch

PROMPT, TOKENS = "hello", 5


@dataclasses.dataclass
class Host:
    ns: str
    ip: str

    @property
    def run_in(self) -> list[str]:
        """The command prefix that runs a process on this host."""
        return ["ip", "netns", "exec", self.ns]


def _ip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_hosts():
    """(server host, client host): two namespaces joined by a veth pair, both deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): cannot make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (`ip netns add`)")
    tag = os.getpid()  # names unique per run: other runs may share this machine
    server, client = Host(f"shardlm-{tag}-s", "10.77.0.1"), Host(f"shardlm-{tag}-c", "10.77.0.2")
    with contextlib.ExitStack() as cleanup:
        for host in (server, client):
            made = _ip("netns", "add", host.ns)
            if made.returncode:
                pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
            cleanup.callback(_ip, "netns", "del", host.ns)  # takes its end of the veth with it
        steps = [("link", "add", f"vs{tag}", "netns", server.ns, "type", "veth", "peer", "name", f"vc{tag}",
                  "netns", client.ns)]
        for host, dev in ((server, f"vs{tag}"), (client, f"vc{tag}")):
            steps += [("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", dev),
                      ("-n", host.ns, "link", "set", dev, "up"), ("-n", host.ns, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode:
                pytest.skip(f"cannot set up the veth pair (ip {' '.join(step)}): {done.stderr.strip()}")
        yield server, client


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as pair:
        yield pair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny("llama", d, seed=5)
    model = load_model(str(d))
    want = generate(model, model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}]), TOKENS,
                    SamplingParams())
    return d, want


@pytest.fixture(scope="module")
def server(hosts, tiny, tmp_path_factory):
    """`shardlm serve -v` on the server host; yields (process, path of its log)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as err, launch.server(["-m", str(tiny[0]), "--threads", "1", "-v"], host=hosts[0].ip,
                                              prefix=hosts[0].run_in, stderr=err) as srv:
        yield srv, log


def generate_on(host: Host, address: str, srv, model_dir) -> dict:
    """`shardlm generate --json` (v3) run on ``host`` against ``address``."""
    proc = subprocess.run([*host.run_in, sys.executable, "-m", "shardlm.cli", "generate", "-s", address,
                           "--tls-fingerprint", srv.fingerprint, "-m", str(model_dir), "-p", PROMPT, "--protocol", "v3",
                           "--max-tokens", str(TOKENS), "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def seen_from(log, session_id: str) -> str:
    """The peer address the server logged for the session."""
    m = re.search(r"(\S+):\d+ \[" + session_id + r"\]: v3 session started", log.read_text())
    assert m, log.read_text()[-3000:]
    return m.group(1)


def test_v3_between_two_hosts_equals_the_reference(hosts, tiny, server):
    (server_host, client_host), (model_dir, want), (srv, log) = hosts, tiny, server
    assert srv.address.startswith(server_host.ip + ":")
    out = generate_on(client_host, srv.address, srv, model_dir)
    assert out["token_ids"] == want and out["private"] is True
    assert seen_from(log, out["session_id"]) == client_host.ip  # it crossed the veth


def test_v3_through_netsim_proxy_at_20ms_pays_each_round_and_equals_the_reference(hosts, tiny, server):
    (server_host, client_host), (model_dir, want), (srv, log) = hosts, tiny, server
    # the proxy is the client host's WAN link: loopback in, across the veth out
    with launch.proxy(srv.address, rtt="20ms", bw="100mbit", prefix=client_host.run_in) as px:
        out = generate_on(client_host, px.address, srv, model_dir)
    assert out["token_ids"] == want
    assert seen_from(log, out["session_id"]) == client_host.ip
    rounds = out["rounds"] - out["phases"]["setup"]["rounds"]  # those timed: prefill and decode
    assert rounds >= 4 * 2 + 1
    assert out["timing"]["total_ms"] >= rounds * 20, (rounds, out["timing"])
    assert 9.5 < px.report["down"]["mean_delay_ms"] < 16, px.report  # rtt/2 each way, queueing aside
    assert px.report["up"]["bytes"] >= out["bytes_sent"] and px.report["down"]["bytes"] >= out["bytes_received"]
