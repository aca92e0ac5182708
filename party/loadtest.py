"""Load test: N concurrent client sessions against one server, every output checked.

The clients are trio tasks in THIS process sharing one loaded model (8 SmolLM2 client processes
would hold ~2-3 GB each): their client-side work (norms, attention, dealing ``W r`` with
``--offline client``) runs one at a time on this process's thread, so aggregate tokens/s is bounded
by one client process's CPU as much as by the server's. The server's own cost is measured
directly: its CPU seconds (``/proc/PID/stat``, utime + stime, children excluded) over the run
divided by the decode tokens it served, which client CPU does not distort. It is the figure to
compare across loads.

Each client runs whole generations back to back (``runs`` each, or until ``duration`` seconds
have passed, finishing the generation it is in), greedy with EOS ignored, and checks every
generation's tokens against the plaintext reference computed here once: a session whose tokens
differ (lost or mixed rows would show here) or that failed is reported with its error.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import trio

from ..models.reference import generate as reference_generate
from ..models.sampling import SamplingParams
from .client import ClientConfig, connect
from .run import run_generation
from .spec import ProtocolSpec

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc), its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15 of stat(5))


def process_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


async def _server_stats(cfg: ClientConfig) -> dict:
    async with connect(cfg) as conn:
        return (await conn.health()).get("batching", {})


async def load_test(cfg: ClientConfig, model, spec: ProtocolSpec, prompt_ids: list[int], max_tokens: int,
                    clients: int, *, runs: int = 1, duration: float | None = None, server_pid: int | None = None,
                    options: dict | None = None, rss_every: float = 1.0,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Run the load and return the report (see the module's docstring); ``server_pid``: the
    server process on this machine whose CPU time and RSS to read (None: not measured)."""
    sampling = SamplingParams()  # greedy: every session must reproduce the reference
    expected = reference_generate(model, prompt_ids, max_tokens, sampling, stop_ids=())
    sessions: list[dict] = []
    latencies: list[float] = []
    rss: list[tuple[float, float]] = []
    batching0 = await _server_stats(cfg)
    cpu0 = process_cpu_seconds(server_pid) if server_pid else None
    t0 = time.monotonic()
    stop_at = t0 + duration if duration else None

    async def client(index: int) -> None:
        done = 0
        while (stop_at is None and done < runs) or (stop_at is not None and time.monotonic() < stop_at):
            stamps: list[float] = []
            outcome = {"client": index, "run": done}
            try:
                rep = await run_generation(cfg, model, spec, prompt_ids, max_tokens, sampling, ignore_eos=True,
                                           options=options, on_token=lambda _t: stamps.append(time.monotonic()))
                ids = rep.result.token_ids
                outcome.update(session_id=rep.session_id, tokens=len(ids), decode_tokens=rep.result.decode_steps,
                               prefill_ms=round(rep.result.prefill_ms, 1),
                               decode_tokens_per_s=round(rep.result.decode_tokens_per_s, 3),
                               status="ok" if ids == expected else "mismatch")
                if ids != expected:
                    outcome["token_ids"] = ids
                latencies.extend(b - a for a, b in zip(stamps, stamps[1:]))
            except Exception as exc:  # reported per session, the others go on
                outcome.update(status="error", error=f"{type(exc).__name__}: {exc}")
            sessions.append(outcome)
            if progress is not None:
                progress(f"client {index} run {done}: {outcome['status']}")
            done += 1

    async def sample_rss(cancel: trio.CancelScope) -> None:
        with cancel:
            while True:
                rss.append((round(time.monotonic() - t0, 2), round(process_rss_mb(server_pid), 1)))
                await trio.sleep(rss_every)

    async with trio.open_nursery() as outer:
        sampler = trio.CancelScope()
        if server_pid:
            outer.start_soon(sample_rss, sampler)
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
        sampler.cancel()
    wall = time.monotonic() - t0
    cpu = process_cpu_seconds(server_pid) - cpu0 if server_pid else None
    batching1 = await _server_stats(cfg)
    ok = [s for s in sessions if s["status"] == "ok"]
    decode_tokens = sum(s["decode_tokens"] for s in ok)
    positions = sum(len(prompt_ids) + s["tokens"] for s in ok)
    batches = batching1.get("batches", 0) - batching0.get("batches", 0)
    rows = batching1.get("rows", 0) - batching0.get("rows", 0)
    return {
        "protocol": spec.name, "clients": clients, "client_mode": "trio tasks in one process, one model",
        "prompt_tokens": len(prompt_ids), "max_tokens": max_tokens, "runs_per_client": runs, "duration_s": duration,
        "wall_s": round(wall, 3), "sessions": sessions,
        "all_correct": len(ok) == len(sessions) and len(sessions) >= clients,
        "failed": [s for s in sessions if s["status"] != "ok"],
        "decode_tokens": decode_tokens,
        "aggregate_decode_tokens_per_s": round(decode_tokens / wall, 3) if wall else None,
        "latency_ms": {"p50": _ms(percentile(latencies, 50)), "p99": _ms(percentile(latencies, 99)),
                       "mean": _ms(statistics.fmean(latencies) if latencies else None), "n": len(latencies)},
        "server": {
            "pid": server_pid, "cpu_s": round(cpu, 3) if cpu is not None else None,
            # everything the server did in the run (prefills included) per decode token served
            "cpu_s_per_decode_token": round(cpu / decode_tokens, 5) if cpu is not None and decode_tokens else None,
            "cpu_s_per_position": round(cpu / positions, 5) if cpu is not None and positions else None,
            "rss_mb": rss, "rss_mb_max": max((r for _, r in rss), default=None),
            # the products' own CPU (worker threads) per decode token: what batching shares; the rest
            # of cpu_s is per-request handling (TLS, frames, checks), which it does not
            "product_cpu_s_per_decode_token": round((batching1.get("product_cpu_s", 0) - batching0.get(
                "product_cpu_s", 0)) / decode_tokens, 5) if decode_tokens else None,
            "batching": {"enabled": batching1.get("enabled"), "batches": batches,
                         "shared_batches": batching1.get("shared_batches", 0) - batching0.get("shared_batches", 0),
                         "mean_rows": round(rows / batches, 3) if batches else 0.0},
        },
        "load_avg": _loadavg(),
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 2)


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def table(reports: list[dict]) -> str:
    """One line per load test: what `bench --clients` prints without --json."""
    lines = [f"{'protocol':<10} {'clients':>7} {'correct':>9} {'tok/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'srv cpu/tok':>11} "
             f"{'batches':>8} {'rows/b':>6} {'rss MB':>7}"]
    for r in reports:
        s, lat = r["server"], r["latency_ms"]
        ok = sum(x["status"] == "ok" for x in r["sessions"])
        lines.append(f"{r.get('version', r['protocol']):<10} {r['clients']:>7} {ok:>4}/{len(r['sessions']):<4} {r['aggregate_decode_tokens_per_s']:>7.2f} "
                     f"{lat['p50'] or 0:>8.1f} {lat['p99'] or 0:>8.1f} "
                     f"{s['cpu_s_per_decode_token'] if s['cpu_s_per_decode_token'] is not None else '-':>11} "
                     f"{s['batching']['batches']:>8} {s['batching']['mean_rows']:>6.2f} "
                     f"{s['rss_mb_max'] if s['rss_mb_max'] is not None else '-':>7}")
    return "\n".join(lines)
