"""Teacher-forced SmolLM2 accuracy of the v3-mpc executor (two-party simulator).

    SHARDLM_HOME=... python -m shardlm.protocols.mpc.accuracy [N_TOKENS] [THREADS] [ideal|beaver|ot]

One forward over the first N_TOKENS tokens of a fixed text (``Ranges.wide()``; by default with
ideal products, :mod:`ideal`, which give the Beaver engine's values in a fraction of the time;
``beaver`` runs the real engine with dealer triples; ``ot`` is v3-ot's engine, approx_lut.py, with
ideal products, comparisons and table lookups)
with every position's logits revealed (``all_logits``, a simulator-only switch): position i sees
exactly the ground-truth prefix, as i sequential decode steps would, for one forward's rounds.
Reports top-1 agreement of the next-token prediction with the plaintext reference, the
distribution of the per-position max |logit error|, and the reference's top-2 gap wherever the
two disagree (a protocol bug misses by whole logits; approximation noise only flips near ties).
"""
import sys
import time

import torch

from ...models.reference import Reference
from .engine import Engine
from .executor import MPCExecutor, Ranges
from .ideal import IdealEngine
from .approx_lut import IdealLutEngine

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
        "from Mainz, combined movable metal type, oil-based ink and a wooden screw press into a system that could "
        "produce books far faster than any scribe. Before his invention, most books in Europe were copied by hand, "
        "a slow and expensive process that kept literacy limited to the clergy and the wealthy. Within fifty years "
        "printing shops had spread to more than two hundred cities, and millions of volumes were in circulation. "
        "The consequences were profound: scientific ideas could be shared and checked, religious reformers reached "
        "new audiences, and standardized spelling and grammar slowly emerged in many languages. Historians still "
        "debate how much credit belongs to Gutenberg himself, since similar techniques had been developed earlier "
        "in China and Korea, but there is little doubt that the press transformed European society. In the "
        "centuries that followed, newspapers, pamphlets and cheap novels created a reading public that stretched "
        "across social classes, and governments soon learned both to fear and to use the power of print. By the "
        "nineteenth century steam-driven presses could print thousands of pages an hour, and the modern world of "
        "mass communication had begun.")


def teacher_forced(model, ids: list[int], engine: str = "ideal"):
    """(reference logits, v3-mpc logits, executor) for every position of ``ids``: (T, vocab) each."""
    ref = Reference.of(model)
    want = ref.forward(torch.tensor(ids), ref.new_cache(len(ids)), all_logits=True)
    eng = {"ideal": IdealEngine, "beaver": Engine, "ot": IdealLutEngine}[engine]()
    ex = MPCExecutor(model, eng, ranges=Ranges.wide())
    got = ex.forward(ids, all_logits=True).to(torch.float32)
    return want, got, ex


def summary(want: torch.Tensor, got: torch.Tensor) -> dict:
    agree = got.argmax(-1) == want.argmax(-1)
    err = (got - want).abs().amax(-1)
    top2 = want.topk(2, -1).values
    return {"positions": len(want), "agree": int(agree.sum()), "top1": float(agree.float().mean()),
            "err_median": float(err.median()), "err_p90": float(err.quantile(0.9)), "err_max": float(err.max()),
            "gaps_where_different": [float(g) for g in (top2[:, 0] - top2[:, 1])[~agree]]}


def main():
    from ...models.load import load_model

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    model = load_model("smollm2")
    ids = model.tokenizer.encode(TEXT)
    if not 1 <= n <= len(ids) - 1:
        raise SystemExit(f"N_TOKENS must be in 1..{len(ids) - 1}")
    t0 = time.time()
    want, got, ex = teacher_forced(model, ids[:n], sys.argv[3] if len(sys.argv) > 3 else "ideal")
    s = summary(want, got)
    print(f"top-1 {s['agree']}/{n} = {s['top1']:.4f}; max |logit err| per position: median {s['err_median']:.3g} "
          f"p90 {s['err_p90']:.3g} max {s['err_max']:.3g}; reference top-2 gaps where they differ: "
          f"{[round(g, 4) for g in s['gaps_where_different']]}; {time.time() - t0:.0f} s")
    print(ex.e.stats, ex.e.provider.issued)


if __name__ == "__main__":
    main()
