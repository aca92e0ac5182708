"""Benchmark the link between two real processes: small-message RTT and 1 MiB tensor throughput.

    python -m shardlm.party.bench_link [--rounds 200] [--frames 100] [--net rtt=20ms,bw=100mbit] [--json]

Starts `shardlm serve` as a child process on loopback with a fresh pinned certificate, then
from this process: the median round trip of a 64-byte PING (echo session), the throughput of
1 MiB uint64 tensors sent to the server (acknowledged with a small PONG each), and of 1 MiB
echoed both ways. Plain-TCP figures are not measured here: every shardlm link is TLS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import trio

from ..wire import netsim
from . import launch
from .client import ClientConfig, connect


async def measure(cfg: ClientConfig, rounds: int, nframes: int) -> dict:
    tensor = np.random.default_rng(0).integers(0, 2**63, 1 << 17, dtype=np.uint64)  # 1 MiB
    async with connect(cfg) as conn:
        await conn.open_session("echo")
        for _ in range(10):  # warm-up
            await conn.ping(b"x" * 64)
        rtts = [(await conn.ping(b"x" * 64))[0] for _ in range(rounds)]
        await conn.ping(tensor, echo=False)
        t0 = time.perf_counter()
        for _ in range(nframes):
            await conn.ping(tensor, echo=False)
        up = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(nframes):
            await conn.ping(tensor, echo=True)
        both = time.perf_counter() - t0
    mib = tensor.nbytes / 2**20
    return {
        "rtt_median_ms": statistics.median(rtts) * 1e3,
        "rtt_p90_ms": sorted(rtts)[int(0.9 * len(rtts))] * 1e3,
        "upload_MBps": nframes * tensor.nbytes / up / 1e6,
        "upload_ms_per_MiB_frame": up / nframes / mib * 1e3,
        "echo_MBps_each_way": nframes * tensor.nbytes / both / 1e6,
        "rounds": rounds, "frames": nframes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--net", default=None, help="netsim spec on the client side, e.g. rtt=20ms,bw=100mbit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    net = netsim.parse_netspec(args.net) if args.net else None
    with launch.server() as srv:
        result = trio.run(measure, srv.client_config(timeout=120, net=net), args.rounds, args.frames)
    result["net"] = args.net or "loopback"
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:26s} {v:.3f}" if isinstance(v, float) else f"{k:26s} {v}")


if __name__ == "__main__":
    main()
