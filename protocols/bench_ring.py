"""Micro-benchmark: the exact ring product vs a float32 matmul of the same shape, same run.

    python -m shardlm.protocols.bench_ring [--threads 1] [--tokens 1 100] [--json]

Shapes are one SmolLM2 layer's linear ops (fused qkv 960x576, o 576x576, gate+up 3072x576,
down 576x1536) and the tied LM head 49152x576, weights scaled like 16-fractional-bit SmolLM2
weights. Prints per-shape milliseconds and the ring/float32 ratio.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import ring

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(tokens: list[int], reps: int) -> list[dict]:
    fx = ring.FixedPoint()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (out_dim, in_dim) in SHAPES.items():
        w = torch.randn(out_dim, in_dim, generator=g) * 0.05
        w[0, 0] = 9.25  # SmolLM2's largest |W| is ~9.25 (606208 at 16 bits)
        W = ring.RingMatrix.from_float(w, fx)
        for n in tokens:
            x = torch.randn(n, in_dim, generator=g)
            m = ring.random_ring(n, in_dim)
            f32 = best_of(lambda: torch.matmul(x, w.t()), reps)
            exact = best_of(lambda: W.matmul(m), reps)
            rows.append({"op": name, "out": out_dim, "in": in_dim, "tokens": n, "limbs": W.n_limbs,
                         "float32_ms": f32 * 1e3, "ring_ms": exact * 1e3, "ratio": exact / f32})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="exact ring product vs float32 matmul")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.tokens, args.reps)
    if args.json:
        print(json.dumps({"threads": args.threads, "rows": rows}))
        return
    print(f"threads={args.threads}")
    print(f"{'op':8s} {'shape':>11s} {'T':>4s} {'limbs':>5s} {'f32 ms':>8s} {'ring ms':>8s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['op']:8s} {r['out']:>5d}x{r['in']:<5d} {r['tokens']:>4d} {r['limbs']:>5d} "
              f"{r['float32_ms']:8.3f} {r['ring_ms']:8.3f} {r['ratio']:6.2f}")


if __name__ == "__main__":
    main()
