"""Micro-benchmark: the exact ring product vs a float32 matmul of the same shapes, same run.

    python -m shardlm.protocols.bench_ring [--threads 1] [--tokens 1 36 100] [--json]

The shapes are every linear unit of one SmolLM2 decode step as v3 fuses them (30 x [qkv
960x576, o 576x576, gate+up 3072x576, down 576x1536] + the tied LM head 49152x576), each with
its own weights, so the sweep streams all of them from memory like a real step does (a
one-matrix loop would sit in cache and flatter both sides). Reports the best of ``--reps``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import ring

LAYER = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
SHAPES = LAYER * 30 + [("lm_head", 49152, 576)]


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(tokens: list[int], reps: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) * 0.05 for _, o, i in SHAPES]
    wts = [w.t().contiguous() for w in weights]  # the reference's layout for one-row products
    rings = [ring.RingMatrix.from_float(w) for w in weights]
    rows = []
    for n in tokens:
        xs = [torch.randn(n, w.shape[1], generator=g) for w in weights]
        ms = [ring.random_ring(n, w.shape[1]) for w in weights]
        f32 = best_of(lambda: [torch.matmul(x, wt) for x, wt in zip(xs, wts)], reps)
        exact = best_of(lambda: [R.matmul(m) for R, m in zip(rings, ms)], reps)
        rows.append({"tokens": n, "units": len(SHAPES), "float32_ms": f32 * 1e3, "ring_ms": exact * 1e3,
                     "ratio": exact / f32})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="exact ring product vs float32 matmul over SmolLM2's shapes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 36, 100])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.reps)
    if args.json:
        print(json.dumps({"threads": args.threads, "rows": rows}))
        return
    print(f"threads={args.threads}, {len(SHAPES)} units (one SmolLM2 forward), best of {args.reps}")
    print(f"{'tokens':>6s} {'float32 ms':>11s} {'ring ms':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['tokens']:>6d} {r['float32_ms']:11.1f} {r['ring_ms']:9.1f} {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
