"""What low-bits replies (protocols/lowbits.py) cost in accuracy and save in bytes, per setting.

    python -m shardlm.protocols.bench_lowbits [--model smollm2] [--variant v3] [--tokens 200]
        [--activation-bits 28 32 36] [--greedy 16] [--json]

For the full reply and each ``--activation-bits`` value: the reply bytes of one decode token
(every unit's row, the LM head's included), the fewest fractional bits each kind of unit's
inputs kept, and against the plaintext reference the teacher-forced top-1 agreement and largest
logit error over ``--tokens`` tokens of a fixed text (protocols/mpc/accuracy.TEXT), the
milliseconds that packing and unpacking one decode step's replies take, and whether a greedy
generation of ``--greedy`` tokens from the demo prompt equals the reference's. The
client is the real MaskedClient; the server's products run in this process (no sockets: the
figures are the arithmetic's), so the teacher-forced pass is one batch of all positions, whose
shared fractional bits are the worst case a prefill meets.
"""
from __future__ import annotations

import argparse
import collections
import json

import torch
import trio

from ..models.executor import forward_steps, run_async
from ..models.reference import Reference, generate
from ..models.sampling import SamplingParams
from . import lowbits, masked, offline, ring
from .mpc.accuracy import TEXT
from .units import FUSED, PRECOMPOSED, matrices_for, rows_needed, units_for

DEMO_PROMPT = "Hello, how are you?"


class LoopChannel:
    """The server's side of MASKED_LINEAR in this process: ``W m``, packed as the server packs it."""

    def __init__(self, matrices: dict):
        self.matrices = matrices
        self.reply_bytes: collections.Counter = collections.Counter()

    async def request(self, msg_type, body: dict, expect) -> dict:
        y = self.matrices[body["unit"]].matmul(torch.from_numpy(body["m"]))
        packed = lowbits.pack(y, body.get("bits", lowbits.RING_BITS), body.get("shift", 0))
        self.reply_bytes[body["unit"]] += packed.nbytes
        return {"y": packed}


def client_for(model, variant: str, mode: str, activation_bits: int | None, rows: dict[str, int]):
    store = offline.deal_locally(model, variant, rows)
    c = masked.MaskedClient(LoopChannel(matrices_for(model, variant)), model, variant, store, reply_bits=mode)
    if activation_bits is not None:
        c.activation_bits = activation_bits
    return c


def decode_bytes(client) -> int:
    """Reply bytes of one decode step (one row per unit), from the units' widths."""
    return sum(lowbits.row_bytes(u.out_dim, client.window(name, client.material.shift)[1])
               for name, u in client.units.items())


def codec_ms(client, reps: int = 5) -> float:
    """Best-of-``reps`` milliseconds to pack, unpack and sign-extend one decode step's replies
    (one row per unit) at the client's widths: the CPU the window costs the two parties."""
    import time

    widths = {name: client.window(name, client.material.shift) for name in client.units}
    ys = {name: ring.random_ring(1, u.out_dim) for name, u in client.units.items()}
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for name, u in client.units.items():
            lo, b = widths[name]
            lowbits.wrap(lowbits.unpack(lowbits.pack(ys[name], b, lo), u.out_dim, b), b)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def teacher_forced(model, variant: str, mode: str, activation_bits: int | None, ids: list[int]) -> dict:
    c = client_for(model, variant, mode, activation_bits, {n: len(ids) for n in units_for(model.plan, variant)})
    cache = c.new_cache(len(ids))
    gen = forward_steps(model.plan, model.weights, torch.tensor(ids), cache, c.ref.rope, fuse=FUSED[variant],
                        all_logits=True, precompose=variant in PRECOMPOSED)
    got = trio.run(run_async, gen, c.linear)
    ref = Reference.of(model)
    want = ref.forward(torch.tensor(ids), ref.new_cache(len(ids)), all_logits=True)
    agree = got.argmax(-1) == want.argmax(-1)
    return {"top1": float(agree.float().mean()), "disagree": int((~agree).sum()),
            "err_max": float((got - want).abs().max()), "fraction_bits_min": c.protocol_stats["fraction_bits_min"],
            "decode_reply_bytes": decode_bytes(c), "codec_ms_per_decode_step": round(codec_ms(c), 2),
            "widths": sorted({c.window(n, 0)[1] for n in c.units})}


def greedy(model, variant: str, mode: str, activation_bits: int | None, prompt: list[int], n: int) -> bool:
    c = client_for(model, variant, mode, activation_bits, rows_needed(units_for(model.plan, variant), len(prompt), n))
    c.new_cache(len(prompt) + n)

    async def run():
        out, ids = [], prompt
        for _ in range(n):
            logits = await c.forward(ids)
            ids = [int(logits.argmax())]
            out.append(ids[0])
        return out
    return trio.run(run) == generate(model, prompt, n, SamplingParams(), stop_ids=())


def main() -> None:
    from ..models.load import load_model

    ap = argparse.ArgumentParser(description="low-bits replies: bytes saved, fractional bits kept, accuracy")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--variant", default="v3", choices=sorted(FUSED))
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--activation-bits", type=int, nargs="+", default=[lowbits.ACTIVATION_BITS])
    ap.add_argument("--greedy", type=int, default=16, help="tokens of greedy generation to compare (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    ids = model.tokenizer.encode(TEXT)[:args.tokens]
    prompt = model.tokenizer.encode_prompt(DEMO_PROMPT)  # through the chat template, as `shardlm demo`
    rows = []
    for mode, a in [("full", None)] + [("low", a) for a in args.activation_bits]:
        try:
            row = {"mode": mode, "activation_bits": a, **teacher_forced(model, args.variant, mode, a, ids)}
        except OverflowError as exc:  # too few bits for some unit's activations: that setting fails
            row = {"mode": mode, "activation_bits": a, "error": str(exc)}
        if args.greedy and "error" not in row:
            row["greedy_equal"] = greedy(model, args.variant, mode, a, prompt, args.greedy)
        rows.append(row)
        if not args.json:
            print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "variant": args.variant, "tokens": len(ids), "rows": rows}))


if __name__ == "__main__":
    main()
