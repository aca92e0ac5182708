"""``shardlm bench``: every protocol measured side by side in one run, in the seeds' JSON format.

Each run is one whole generation in a fresh session (handshake, offline phase, prefill,
decode of exactly ``max_tokens`` tokens: EOS is ignored so runs are comparable). Per protocol
the output follows seed 001 Appendix A (``model``, ``version``, ``config``, ``results`` with
``embedding``/``prefill``/``total`` statistics and ``tokens_per_second``), extended with
``decode`` statistics, decode tokens/s, bytes each way and rounds (per run and per decode
token), offline time, ``ratio_to_plain`` when ``plain`` ran in the same invocation, and with
``--verify`` the time its keys (offline) and checks (online) took.
"""

from __future__ import annotations

import datetime
import resource
import platform
import statistics
from typing import Callable

from ..models.sampling import SamplingParams
from .client import ClientConfig
from .run import run_generation
from .spec import ProtocolSpec


def timing_stats(values: list[float]) -> dict:
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]

    return {
        "mean_ms": statistics.fmean(xs), "std_ms": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
        "min_ms": xs[0], "max_ms": xs[-1], "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
    }


async def bench_protocol(cfg: ClientConfig, model, spec: ProtocolSpec, prompt_ids: list[int], max_tokens: int,
                         runs: int, warmup: int, sampling: SamplingParams,
                         progress: Callable[[str], None] | None = None, options: dict | None = None) -> dict:
    protocol = spec.name
    reports = []
    for i in range(warmup + runs):
        rep = await run_generation(cfg, model, spec, prompt_ids, max_tokens, sampling, ignore_eos=True,
                                   options=options)
        if progress is not None:
            kind = "warmup" if i < warmup else "run"
            progress(f"{protocol}: {kind} {i + 1 - (warmup if i >= warmup else 0)}/{warmup if i < warmup else runs} "
                     f"prefill {rep.result.prefill_ms:.0f} ms, decode {rep.result.decode_tokens_per_s:.2f} tok/s")
        if i >= warmup:
            reports.append(rep.as_dict())
    t = [r["timing"] for r in reports]
    drafted = [r["drafting"] for r in reports if r.get("drafting")]
    checked = [r["verification"] for r in reports if r.get("verification")]
    decode_tps = [x["decode_tokens_per_s"] for x in t]
    n_decode = max(1, max_tokens - 1)
    positions = len(prompt_ids) + max_tokens
    offline = None
    if reports[0].get("offline"):  # masked protocols: who computed W r, and what it cost per position
        costs = [r["offline"] for r in reports]
        offline = {"mode": costs[0]["mode"], **{
            f"{k}_per_token": statistics.fmean(c.get(k, 0.0) for c in costs) / positions
            for k in ("client_cpu_s", "server_cpu_s")}, **{
            # on the session's channel (he) plus any other connection the source used (the dealer's)
            f"{k}_per_token": statistics.fmean(r["phases"].get("offline", {}).get(k, 0) + r["offline"].get(k, 0)
                                               for r in reports) / positions
            for k in ("bytes_sent", "bytes_received")}}
    return {
        "model": model.name, "gpu": None, "device": cfg_device_note(),
        "version": protocol, "endpoint": protocol, "private": reports[0]["private"],
        "notes": reports[0].get("notes", []),
        "protocol_stats": reports[0].get("protocol_stats"),
        "verify": reports[0]["verify"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "config": {"prompt_tokens": len(prompt_ids), "max_new_tokens": max_tokens,
                   "temperature": sampling.temperature, "runs": runs, "warmup": warmup, "endpoint": protocol,
                   "net": cfg.net.describe() if cfg.net else "none",
                   "options": spec.resolve_options(options)},
        "results": {
            "embedding": timing_stats([x["embedding_ms"] for x in t]),
            "prefill": timing_stats([x["prefill_ms"] for x in t]),
            "decode": timing_stats([x["decode_ms"] for x in t]),
            "total": timing_stats([x["total_ms"] for x in t]),
            "tokens_per_second": statistics.fmean(
                (r["generated_tokens"]) / (r["timing"]["total_ms"] / 1e3) for r in reports),
            "decode_tokens_per_second": statistics.fmean(decode_tps),
            "offline_ms": statistics.fmean(r["offline_ms"] for r in reports),
            "offline_ms_per_token": statistics.fmean(r["offline_ms"] for r in reports) / (len(prompt_ids) + max_tokens),
            "bytes_sent": statistics.fmean(r["bytes_sent"] for r in reports),
            "bytes_received": statistics.fmean(r["bytes_received"] for r in reports),
            "rounds": statistics.fmean(r["rounds"] for r in reports),
            "prefill_rounds": reports[0]["prefill_rounds"],
            **({"offline": offline} if offline else {}),
            # speculative decoding (party/speculative): tokens each decode forward committed
            **({"drafting": {"draft": drafted[0]["draft"], "draft_len": drafted[0]["draft_len"],
                             **{k: statistics.fmean(d[k] or 0.0 for d in drafted)
                                for k in ("tokens_per_forward", "forwards_per_token", "decode_forwards")}}}
               if drafted else {}),
            # the client process's peak so far: one bench run per protocol gives that protocol's peak
            "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **({"verify_setup_ms": statistics.fmean(v["setup_ms"] for v in checked),
                "verify_check_ms": statistics.fmean(v["check_ms"] for v in checked)} if checked else {}),
            "per_decode_token": {
                k: statistics.fmean(r["phases"].get("decode", {}).get(k, 0) / n_decode for r in reports)
                for k in ("bytes_sent", "bytes_received", "rounds")
            },
        },
    }


def cfg_device_note() -> str:
    return f"{platform.machine()} CPU"


def add_ratios(results: list[dict]) -> None:
    """``ratio_to_plain``: speed relative to plain in the same run (>1 is faster than plain)."""
    plain = next((r for r in results if r["version"] == "plain"), None)
    if plain is None:
        return
    p = plain["results"]
    for r in results:
        x = r["results"]
        x["ratio_to_plain"] = {
            "prefill_speed": p["prefill"]["mean_ms"] / x["prefill"]["mean_ms"],
            "decode_tokens_per_second": x["decode_tokens_per_second"] / p["decode_tokens_per_second"],
        }


def table(results: list[dict]) -> str:
    """The human summary of ``shardlm bench``: one line per protocol, then notes and warnings."""
    lines = [f"{'protocol':8s} {'prefill ms':>11s} {'decode tok/s':>12s} {'ratio':>6s} {'B/token up':>11s} "
             f"{'B/token down':>12s} {'rounds/tok':>10s} {'tok/fwd':>7s} {'offline ms':>10s}"]
    for r in results:
        x = r["results"]
        ratio = x.get("ratio_to_plain", {}).get("decode_tokens_per_second")
        lines.append(f"{r['version']:8s} {x['prefill']['mean_ms']:11.1f} {x['decode_tokens_per_second']:12.2f} "
                     f"{(f'{ratio:.2f}' if ratio else '-'):>6s} {x['per_decode_token']['bytes_sent']:11.0f} "
                     f"{x['per_decode_token']['bytes_received']:12.0f} {x['per_decode_token']['rounds']:10.1f} "
                     f"{x.get('drafting', {}).get('tokens_per_forward', 1.0):7.2f} {x['offline_ms']:10.0f}")
    for r in results:
        o = r["results"].get("offline")
        if o:
            lines.append(f"offline ({r['version']}): --offline {o['mode']}, per position: client CPU "
                         f"{o['client_cpu_s_per_token'] * 1e3:.0f} ms, server CPU {o['server_cpu_s_per_token'] * 1e3:.0f} ms, "
                         f"{o['bytes_sent_per_token'] / 1e6:.2f} MB up, {o['bytes_received_per_token'] / 1e6:.2f} MB down; "
                         f"client peak RSS {r['results']['client_peak_rss_mb']:.0f} MB")
    for r in results:  # v3-mpc / v3-ot: OTs and table lookups per decode forward (the prompt's forward left out)
        fw = ((r.get("protocol_stats") or {}).get("forwards") or [])[1:]
        if fw and any(f.get("ots") for f in fw):
            n = len(fw)
            ots, looks = sum(f.get("ots", 0) for f in fw) / n, sum(f.get("lookups", 0) for f in fw) / n
            line = f"ot ({r['version']}): per decode forward {ots:,.0f} OTs (this party's IKNP extensions)"
            if looks:
                per = sum(f.get("lookup_bytes", 0) for f in fw) / n / looks
                line += f", {looks:,.0f} table lookups of {per / 1024:.1f} KiB each on average (the seeds claim 48 KB)"
            lines.append(line)
    lines += [f"note ({r['version']}): {n}" for r in results for n in r.get("notes", [])]
    exposed = [r["version"] for r in results if not r["private"]]
    if exposed:
        lines.append(f"NOT PRIVATE: {', '.join(exposed)} (the server sees tokens or hidden states)")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    names = [r["version"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [r["results"]["prefill"]["mean_ms"] for r in results],
          yerr=[r["results"]["prefill"]["std_ms"] for r in results], color="tab:blue")
    a.set_ylabel("prefill ms (mean)")
    a.set_title(f"prefill, {results[0]['config']['prompt_tokens']} tokens")
    b.bar(names, [r["results"]["decode_tokens_per_second"] for r in results], color="tab:green")
    b.set_ylabel("decode tokens/s")
    b.set_title(f"decode, net: {results[0]['config']['net']}")
    fig.suptitle(f"shardlm bench: {results[0]['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
