"""Benchmark: what the masked protocols' server matrices hold resident, and what the kernels cost.

    python -m shardlm.protocols.bench_memory [--model smollm2] [--protocols v2 v3 v3-2r] [--rows 1 36]
    python -m shardlm.protocols.bench_memory --kernels [--rows 1 4]

The first form builds each protocol's matrices as a server does (units.matrix_for, prepare), in
order, and reports after each: the process RSS, the bytes units.resident reports (what ``info``
shows), then one sweep over every unit per protocol and row count (best of ``--reps``: 1 row is a
decode step's products, 36 a prefill's). The second times the decode kernels over SmolLM2's v3
shapes with random weights (fbgemm's packed copy against torch._int_mm on the plain planes against
the float64 limbs), side by side in one process. Reports are JSON lines; load them with the
machine's load average (printed), the figures are not comparable across loads.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import ring, units
from .bench_ring import best_of

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2: qkv, o, gate+up, down
SHAPES = LAYER * 30 + [(49152, 576)]


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def trimmed_rss() -> int:
    """RSS once freed memory is handed back (glibc keeps freed heap pages of the build's
    temporaries otherwise): closer to what the matrices hold."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return rss()


def load() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def resident_run(model_spec: str, protocols: list[str], rows: list[int], reps: int) -> None:
    from ..models.load import load_model

    model = load_model(model_spec)
    for t in model.weights.values():  # page the float weights in: the server reads them all
        t.sum()
    print(json.dumps({"model": model_spec, "model_weights": units.model_weights(model), "rss": rss(),
                      "rss_trimmed": trimmed_rss(), "load": load()}))
    for v in protocols:
        t0 = time.perf_counter()
        for u in units.units_for(model.plan, v).values():
            units.matrix_for(model, u).prepare()
        res = units.resident(model, protocols)
        print(json.dumps({"built": v, "seconds": round(time.perf_counter() - t0, 1), "rss": rss(),
                          "rss_trimmed": trimmed_rss(),
                          "resident": res["protocols"][v], "all": res["total"], "load": load()}), flush=True)
    for v in protocols:
        us = units.units_for(model.plan, v)
        mats = {k: units.matrix_for(model, u) for k, u in us.items()}
        for n in rows:
            ms = {k: ring.random_ring(1 if u.head else n, u.in_dim) for k, u in us.items()}
            t = best_of(lambda: [mats[k].matmul(ms[k]) for k in us], reps)
            print(json.dumps({"protocol": v, "rows": n, "sweep_ms": round(t * 1e3, 1), "load": load()}), flush=True)


def kernels_run(rows: list[int], reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randint(-ring.WMAX, ring.WMAX + 1, s, generator=g) for s in SHAPES]
    kinds = ["int_mm", "fbgemm"] if ring.fbgemm_exact() else ["int_mm"]
    sets = {k: [ring.RingMatrix(w, kernel=k) for w in ws] for k in kinds}
    for mats in sets.values():
        for R in mats:
            R.prepare()
    for n in rows:
        ms = [ring.random_ring(n, w.shape[1]) for w in ws]
        out = {k: round(best_of(lambda: [R._matmul_int8(m) for R, m in zip(mats, ms)], reps) * 1e3, 1)
               for k, mats in sets.items()}
        out["float64"] = round(best_of(lambda: [R._matmul_f64(m) for R, m in zip(sets["int_mm"], ms)], reps) * 1e3, 1)
        print(json.dumps({"rows": n, "sweep_ms": out, "units": len(SHAPES), "load": load()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="resident bytes of the masked protocols' matrices; kernel times")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--protocols", nargs="+", default=["v2", "v3", "v3-2r"])
    ap.add_argument("--rows", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernels", action="store_true", help="time the decode kernels instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernels_run(args.rows or [1, 4], args.reps)
    else:
        resident_run(args.model, args.protocols, args.rows or [1, 36], args.reps)


if __name__ == "__main__":
    main()
