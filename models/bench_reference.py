"""Plaintext reference timings on SmolLM2: `python -m shardlm.models.bench_reference [--threads 2]`.

Prints the load time from the cache, prefill time (median of --repeats) for a 19-token and a
100-token prompt, and greedy decode tokens/s (plus the median step, robust to a busy machine). Fetches the model first if it is not cached (not timed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TEXT = ("Private inference splits a language model between two parties: the client keeps the prompt "
        "and the generated text, while the server, which owns the fast hardware, performs the large "
        "matrix products on masked inputs. Every protocol in this project is checked against a plain "
        "reference forward pass, so the reference must be both exact and reasonably fast on a small "
        "CPU with two cores and no accelerator at all, which is what these numbers measure. The decode "
        "rate below is for one token at a time after a short prompt, with the key/value cache.")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from .fetch import KNOWN, fetch
    from .load import load_model
    from .reference import Reference

    if args.model in KNOWN:
        fetch(args.model, progress=True)
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fingerprint()
    fingerprint_s = time.perf_counter() - t0

    ref = Reference(model)
    ids = model.tokenizer.encode(TEXT)
    if len(ids) < 100:
        raise SystemExit(f"benchmark text encodes to only {len(ids)} tokens")
    prompts = {"prefill_19_s": ids[:19], "prefill_100_s": ids[:100]}
    ref.prefill(ids[:19], ref.new_cache())  # warm-up (allocator, rope tables)
    result = {"model": args.model, "device": args.device, "threads": args.threads, "load_s": load_s, "fingerprint_s": fingerprint_s}
    for key, p in prompts.items():
        result[key] = _median_time(lambda: ref.prefill(p, ref.new_cache(len(p))), args.repeats)

    cache = ref.new_cache(19 + args.decode_tokens)
    tok = int(ref.prefill(ids[:19], cache).argmax())
    steps = []
    for _ in range(args.decode_tokens):
        t0 = time.perf_counter()
        tok = int(ref.decode(tok, cache).argmax())
        steps.append(time.perf_counter() - t0)
    result["decode_tokens"] = args.decode_tokens
    result["decode_tok_per_s"] = len(steps) / sum(steps)
    # The median step as well: on a shared machine a few stalled steps drag the mean down.
    result["decode_ms_per_token_median"] = 1000 * statistics.median(steps)

    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {args.model}, {args.threads} torch threads, float32")
        print(f"  load from cache       {result['load_s']:.3f} s   (+ fingerprint {fingerprint_s:.3f} s)")
        print(f"  prefill 19 tokens     {result['prefill_19_s'] * 1000:.1f} ms")
        print(f"  prefill 100 tokens    {result['prefill_100_s'] * 1000:.1f} ms")
        print(f"  decode                {result['decode_tok_per_s']:.1f} tokens/s over {args.decode_tokens} tokens "
              f"(median step {result['decode_ms_per_token_median']:.1f} ms)")
    return result


if __name__ == "__main__":
    main()
