"""Benchmark: cross-session batching on vs off, 1..N concurrent clients, one run.

    python -m shardlm.protocols.bench_batching [-m smollm2] [--clients 1,2,4,8] [--windows 5,0]
        [--prompt-tokens 8] [--max-tokens 8] [--runs 1] [--output FILE]

Per batch window (ms; 0 = batching off) it starts one ``serve`` process (one torch thread,
``--preload`` of the protocol), measures the first session's prefill after the server said
ready against a second (warm) session's, then runs party/loadtest at each client count against
that same server (the server's CPU read from /proc). The primary figure is the server's CPU
seconds per served decode token: the clients are trio tasks in this process and compete for
the same 2 cores, so tokens/s and latencies say as much about the client as about the server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import trio

from ..models.load import load_model
from ..models.sampling import SamplingParams
from ..party import launch, loadtest
from ..party.run import run_generation
from . import registry

TEXT = "The history of cryptography begins with simple substitution ciphers and leads to public keys. "


async def _one(cfg, model, spec, ids, tokens) -> float:
    rep = await run_generation(cfg, model, spec, ids, tokens, SamplingParams(), ignore_eos=True)
    return rep.result.prefill_ms


def run(model_spec: str, protocol: str, counts: list[int], windows: list[float], prompt_tokens: int,
        max_tokens: int, runs: int) -> dict:
    model = load_model(model_spec)
    spec = registry.get(protocol)
    base = model.tokenizer.encode(TEXT)
    ids = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {"model": model.name, "protocol": protocol, "prompt_tokens": len(ids), "max_tokens": max_tokens,
           "runs_per_client": runs, "by_window": []}
    for window in windows:
        args = ["--model", model_spec, "--threads", "1", "--preload", protocol, "--batch-window-ms", str(window)]
        with launch.server(args, env=env) as srv:
            cfg = srv.client_config(timeout=600)
            first = trio.run(_one, cfg, model, spec, ids, 2)
            warm = trio.run(_one, cfg, model, spec, ids, 2)
            entry = {"batch_window_ms": window, "first_prefill_ms": round(first, 1),
                     "warm_prefill_ms": round(warm, 1), "first_over_warm": round(first / warm, 3), "loads": []}
            for n in counts:
                rep = trio.run(lambda: loadtest.load_test(cfg, model, spec, ids, max_tokens, n, runs=runs,
                                                          server_pid=srv.proc.pid))
                rep.pop("sessions")
                entry["loads"].append(rep)
                print(f"window {window} ms, {n} clients: {json.dumps(_summary(rep))}", file=sys.stderr, flush=True)
        out["by_window"].append(entry)
    return out


def _summary(rep: dict) -> dict:
    s = rep["server"]
    return {"clients": rep["clients"], "correct": rep["all_correct"], "tok_s": rep["aggregate_decode_tokens_per_s"],
            "p50_ms": rep["latency_ms"]["p50"], "p99_ms": rep["latency_ms"]["p99"],
            "server_cpu_s_per_decode_token": s["cpu_s_per_decode_token"],
            "product_cpu_s_per_decode_token": s.get("product_cpu_s_per_decode_token"),
            "mean_rows": s["batching"]["mean_rows"],
            "rss_mb_max": s["rss_mb_max"], "load": rep["load_avg"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--protocol", default="v3")
    ap.add_argument("--clients", default="1,2,4,8", help="comma list of concurrent client counts")
    ap.add_argument("--windows", default="5,0", help="comma list of batch windows in ms (0: batching off)")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1, help="generations per client")
    ap.add_argument("--output", help="write the JSON here too")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    doc = run(a.model, a.protocol, [int(c) for c in a.clients.split(",")], [float(w) for w in a.windows.split(",")],
              a.prompt_tokens, a.max_tokens, a.runs)
    for entry in doc["by_window"]:
        base = entry["loads"][0]["server"]["cpu_s_per_decode_token"]
        for rep in entry["loads"]:
            cpu = rep["server"]["cpu_s_per_decode_token"]
            rep["server"]["cpu_per_token_vs_first"] = round(cpu / base, 3) if cpu and base else None
    text = json.dumps(doc, indent=2)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
    print(json.dumps([{"window_ms": e["batch_window_ms"], "first_over_warm": e["first_over_warm"],
                       "loads": [_summary(r) | {"vs_first": r["server"]["cpu_per_token_vs_first"]}
                                 for r in e["loads"]]} for e in doc["by_window"]], indent=1))


if __name__ == "__main__":
    main()
