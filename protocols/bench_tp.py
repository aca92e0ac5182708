"""Benchmark: ``serve --tp N`` against ``--tp 1``, v3, in one run (servers one at a time, alternated).

    python -m shardlm.protocols.bench_tp [-m smollm2] [--tp 1 2] [--rounds 2] [--max-tokens 16] [--json]

Per server: prefill and decode times of ``bench``'s runs (a fresh session each), the server's
CPU seconds per decode token (rank 0 and its worker ranks, from /proc), and the collective
traffic: measured on rank 0 over the runs, and per decode token from the shard shapes (header,
the masked row broadcast and the padded gather, to each of the other ranks). On a 2-core
machine two ranks share the cores the one rank had: expect overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import trio

from ..models.load import load_model
from ..models.sampling import SamplingParams
from ..party import launch
from ..party.bench import bench_protocol
from ..party.client import connect
from . import registry


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


async def _info(srv) -> dict:
    async with connect(srv.client_config(timeout=60)) as conn:
        return await conn.info()


def decode_collective_bytes(tp_info: dict) -> int:
    """Bytes rank 0 exchanges per decode step of v3 (one row per unit) with the other ranks."""
    ranks = tp_info["shards"]["v3"]
    size = len(ranks)
    total = 0
    for unit, blocks in ranks[0]["units"].items():
        in_dim = sum(b[1] for b in blocks)
        widest = max(sum(b[0] for b in r["units"][unit]) for r in ranks)
        total += (size - 1) * (4 * 8 + 8 * in_dim + 8 * widest)
    return total


def run_one(model_spec: str, model, tp: int, args) -> dict:
    with launch.server(["--model", model_spec, "--tp", str(tp), "--threads", str(args.threads), "--preload", "v3"],
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}) as srv:
        pids = [srv.proc.pid, *srv.event.get("tp", {}).get("worker_pids", [])]
        ids = model.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        before = trio.run(_info, srv).get("tp", {})
        cpu0 = _cpu_seconds(pids)
        res = trio.run(lambda: bench_protocol(srv.client_config(timeout=600), model, registry.get("v3"), ids,
                                              args.max_tokens, args.runs, 1, SamplingParams()))
        cpu = _cpu_seconds(pids) - cpu0
        after = trio.run(_info, srv).get("tp", {})
    r = res["results"]
    positions = (len(ids) + args.max_tokens) * (args.runs + 1)
    out = {"tp": tp, "prefill_ms": r["prefill"]["mean_ms"], "decode_tok_s": r["decode_tokens_per_second"],
           "decode_ms_per_token": r["decode"]["mean_ms"] / max(1, args.max_tokens - 1),
           "server_cpu_s_per_position": cpu / positions, "prompt_tokens": len(ids)}
    if after:
        out["collective_bytes_per_run"] = (after["collective_bytes"] - before.get("collective_bytes", 0)) / (args.runs + 1)
        out["collective_bytes_per_decode_token"] = decode_collective_bytes(after)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the --tp servers (noise shows between them)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank and client")
    ap.add_argument("-p", "--prompt", default="Hello, how are you?")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = load_model(args.model)
    rows = []
    for _ in range(args.rounds):
        for tp in args.tp:
            rows.append(run_one(args.model, model, tp, args))
    summary = {}
    for tp in args.tp:
        mine = [r for r in rows if r["tp"] == tp]
        summary[tp] = {k: statistics.fmean(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], (int, float))}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    if args.json:
        print(json.dumps({"runs": rows, "mean": summary, "loadavg": load}, indent=1))
        return
    print(f"v3 {args.model}, {args.max_tokens} tokens, {args.runs} runs x {args.rounds} rounds, "
          f"{args.threads} thread(s) per rank; load {' '.join(load)}")
    print(f"{'tp':>3s} {'prefill ms':>10s} {'decode ms/tok':>13s} {'server CPU s/pos':>16s} {'coll. B/decode tok':>18s}")
    base = summary[args.tp[0]]
    for tp, s in summary.items():
        print(f"{tp:3d} {s['prefill_ms']:10.0f} {s['decode_ms_per_token']:13.1f} {s['server_cpu_s_per_position']:16.3f} "
              f"{s.get('collective_bytes_per_decode_token', 0):18,.0f}   (decode x{s['decode_ms_per_token'] / base['decode_ms_per_token']:.2f}, "
              f"prefill x{s['prefill_ms'] / base['prefill_ms']:.2f} of --tp {args.tp[0]})")


if __name__ == "__main__":
    main()
