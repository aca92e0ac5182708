"""netsim-proxy: a simulated WAN between two unmodified processes (DESIGN.md s10: no netem here)."""
import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import trio

from shardlm.party import bench_proxy, launch
from shardlm.party.client import ClientError, connect
from shardlm.wire import netsim


def shardlm(*args):
    return subprocess.run([sys.executable, "-m", "shardlm.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_link_queues_for_the_bandwidth_and_jitter_never_reorders():
    link = netsim.Link(netsim.parse_netspec("rtt=20ms,bw=8mbit"))
    assert link.send(1000, 0.0) == (0.001, 0.011)  # 1 ms on the wire, then 10 ms one way
    assert link.send(1000, 0.0) == (0.002, 0.012)  # queued behind the first
    assert link.send(0, 1.0) == (1.0, 1.01)  # an idle link: latency only
    jittery = netsim.Link(netsim.parse_netspec("rtt=20ms,jitter=8ms"), random.Random(1))
    arrivals = [jittery.send(10, i * 1e-4)[1] for i in range(500)]
    assert arrivals == sorted(arrivals)  # in order, although each delay varies by up to 8 ms
    delays = [a - i * 1e-4 for i, a in enumerate(arrivals)]
    assert min(delays) >= 0.002 and max(delays) <= 0.018 + 0.05 and max(delays) - min(delays) > 0.005
    assert netsim.parse_netspec("rtt=20ms,jitter=2ms").jitter == 0.002


def test_measured_rtt_and_bandwidth_match_what_was_asked():
    # Loose bounds (a shared, noisy machine); `python -m shardlm.party.bench_proxy` gives precise figures.
    r = bench_proxy.measure("20ms", "20mbit", rounds=20, seconds=0.5)
    assert abs(r["rtt_error_pct"]) < 30, r
    assert abs(r["bw_error_pct"]) < 30, r
    assert 9 < r["proxy_mean_delay_ms"]["down"] < 13, r  # rtt/2 on the echoes, as the proxy itself reports


@pytest.fixture(scope="module")
def echo_server():
    with launch.server([]) as srv:  # no model: the echo protocol only
        yield srv


def _health(cfg):
    async def main():
        async with connect(cfg) as conn:
            return await conn.health()
    return trio.run(main)


def test_tls_passes_through_and_the_pin_still_holds(echo_server):
    srv = echo_server
    with launch.proxy(srv.address, rtt="10ms") as px:
        cfg = srv.client_config(timeout=10)
        assert _health(dataclasses.replace(cfg, server=px.address))["status"] == "ready"
        with pytest.raises(ClientError) as wrong:
            _health(dataclasses.replace(cfg, server=px.address, fingerprint="sha256:" + "00" * 32))
        assert wrong.value.code == "pin_mismatch"
    assert px.report["connections"] == 2 and px.report["resets"] == 0
    assert px.report["up"]["bytes"] > 0 and px.report["down"]["bytes"] > 1000  # the certificate came through
    assert 4.5 < px.report["down"]["mean_delay_ms"] < 8  # rtt/2 (+ the proxy's own ~0.3 ms)


def test_loss_reset_resets_each_connection_and_the_proxy_keeps_serving(echo_server):
    srv = echo_server
    # every connection doomed, within its first 100 bytes: mid ClientHello
    with launch.proxy(srv.address, extra_args=["--loss-reset", "1", "--reset-within", "100", "--seed", "7"]) as px:
        for _ in range(2):
            out = shardlm("health", "-s", px.address, "--tls-fingerprint", srv.fingerprint, "--json")
            assert out.returncode == 1, out.stdout
            err = json.loads(out.stdout)
            assert err["code"] in ("tls_failed", "connection_closed") and "reset" in err["error"].lower(), err
        assert px.proc.poll() is None
    assert px.report["connections"] == 2 and px.report["resets"] == 2
