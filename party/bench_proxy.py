"""Measure what ``shardlm netsim-proxy`` delivers against what it was asked: RTT and bandwidth.

    python -m shardlm.party.bench_proxy [--case 20ms,20mbit ...] [--rounds 200] [--seconds 2] [--json]

For each case a proxy process runs between two plain TCP endpoints of this process: a
ping-pong of 64-byte messages (median round trip against --rtt; the same ping-pong without the
proxy, for what the endpoints cost themselves) and a bulk transfer of
``seconds`` worth of bytes at the asked rate (the receiver's rate from its first byte to its
last, against --bw). Plain TCP, not TLS, so the figures are the proxy's, not the parties'.
tests/test_netsim_proxy.py runs the same measurement, briefly, with a loose bound.
"""

from __future__ import annotations

import argparse
import json
import statistics

import trio

from ..wire import netsim
from . import launch

PING, BULK = b"P", b"B"
PIECE = 64 * 1024


async def _target(stream: trio.SocketStream, sinks: list) -> None:
    """Echo a ping-pong connection; for a bulk one, note when each byte arrived, answer at EOF."""
    async with stream:
        mode = await stream.receive_some(1)
        if mode == PING:
            while data := await stream.receive_some(PIECE):
                await stream.send_all(data)
        elif mode == BULK:
            first = last = None
            total = first_len = 0
            while data := await stream.receive_some(PIECE):
                last = trio.current_time()
                if first is None:
                    first, first_len = last, len(data)
                total += len(data)
            sinks.append({"bytes": total, "rate_bps": (total - first_len) * 8 / (last - first) if last > first else 0})
            await stream.send_all(b"done")


async def _ping_pong(address: str, rounds: int, size: int = 64) -> list[float]:
    host, port = address.rsplit(":", 1)
    msg = b"x" * size
    async with await trio.open_tcp_stream(host, int(port)) as s:
        await s.send_all(PING)
        times = []
        for _ in range(rounds + 3):  # the first three warm the path up
            t0 = trio.current_time()
            await s.send_all(msg)
            got = 0
            while got < size:
                got += len(await s.receive_some(size - got))
            times.append(trio.current_time() - t0)
        return times[3:]


async def _bulk(address: str, nbytes: int, sinks: list) -> dict:
    host, port = address.rsplit(":", 1)
    piece = b"\0" * PIECE
    async with await trio.open_tcp_stream(host, int(port)) as s:
        await s.send_all(BULK)
        for _ in range(max(1, nbytes // PIECE)):
            await s.send_all(piece)
        await s.send_eof()
        await s.receive_some(4)
    return sinks[-1]


def measure(rtt: str, bw: str, *, rounds: int = 100, seconds: float = 2.0, extra_args=()) -> dict:
    """Run a proxy at ``rtt`` / ``bw`` in front of this process's endpoints; asked vs measured."""
    spec = netsim.NetSpec(rtt=netsim.parse_duration(rtt), bandwidth=netsim.parse_rate(bw))
    nbytes = int(spec.bandwidth / 8 * seconds)

    async def main():
        sinks: list = []
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda s: _target(s, sinks), listeners)
            direct = await _ping_pong(f"127.0.0.1:{port}", rounds)
            with launch.proxy(f"127.0.0.1:{port}", rtt=rtt, bw=bw, extra_args=extra_args) as px:
                rtts = await _ping_pong(px.address, rounds)
                sink = await _bulk(px.address, nbytes, sinks)
            nursery.cancel_scope.cancel()
        return direct, rtts, sink, px.report

    direct, rtts, sink, report = trio.run(main)
    rtt_ms = statistics.median(rtts) * 1e3
    mbit = sink["rate_bps"] / 1e6
    return {
        "rtt_ms_asked": spec.rtt * 1e3, "rtt_ms_median": round(rtt_ms, 3),
        "rtt_ms_p90": round(sorted(rtts)[int(0.9 * len(rtts))] * 1e3, 3),
        "rtt_ms_direct": round(statistics.median(direct) * 1e3, 3),  # the same ping-pong without the proxy
        "rtt_error_pct": round((rtt_ms / (spec.rtt * 1e3) - 1) * 100, 2) if spec.rtt else None,
        "bw_mbit_asked": spec.bandwidth / 1e6, "bw_mbit_measured": round(mbit, 3),
        "bw_error_pct": round((mbit / (spec.bandwidth / 1e6) - 1) * 100, 2),
        "bulk_bytes": sink["bytes"], "rounds": rounds,
        "proxy_mean_delay_ms": {k: report[k]["mean_delay_ms"] for k in ("up", "down")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", metavar="RTT,BW",
                    help="e.g. 20ms,20mbit (repeatable; default: 20ms,20mbit 20ms,100mbit 5ms,100mbit 50ms,1gbit)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each bulk transfer at the asked rate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cases = args.case or ["20ms,20mbit", "20ms,100mbit", "5ms,100mbit", "50ms,1gbit"]
    results = []
    for case in cases:
        rtt, bw = case.split(",")
        r = measure(rtt, bw, rounds=args.rounds, seconds=args.seconds)
        results.append(r)
        if not args.json:
            print(f"rtt {r['rtt_ms_asked']:g} ms -> median {r['rtt_ms_median']:.2f} ms ({r['rtt_error_pct']:+.1f}%), "
                  f"p90 {r['rtt_ms_p90']:.2f} ms (direct {r['rtt_ms_direct']:.2f}); "
                  f"bw {r['bw_mbit_asked']:g} Mbit/s -> {r['bw_mbit_measured']:.2f} "
                  f"({r['bw_error_pct']:+.1f}%) over {r['bulk_bytes'] / 1e6:.1f} MB", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
