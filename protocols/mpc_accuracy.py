"""Teacher-forced SmolLM2 accuracy of the v3-mpc executor (simulated two parties).

    SHARDLM_HOME=... python -m shardlm.protocols.mpc_accuracy [N_TOKENS]

At each position the executor (on shares, dealer triples, Ranges.wide()) and the plaintext
reference see the same ground-truth token; reports top-1 agreement of the next-token
prediction and the distribution of the per-token max |logit error|.
"""
import sys
import time

import torch

from shardlm.models.load import load_model
from shardlm.models.reference import Reference
from shardlm.protocols import mpc
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

def main():
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    assert n >= 1
    model = load_model("smollm2")
    ids = model.tokenizer.encode(TEXT) if hasattr(model, "tokenizer") else None
    print("tokens", len(ids))
    ids = ids[:n + 1]
    ref = Reference.of(model)
    cache = ref.new_cache(len(ids) + 4)
    ex = mpc.MPCExecutor(model, ranges=mpc.Ranges.wide())
    agree, errs = 0, []
    t0 = time.time()
    for i in range(n):
        want = ref.forward(torch.tensor([ids[i]]), cache)[-1]
        got = ex.forward([ids[i]])[-1]
        agree += int(got.argmax()) == int(want.argmax())
        errs.append((got - want).abs().max().item())
        if i % 10 == 0 or i == n - 1:
            print(i, f"agree {agree}/{i+1} maxerr {errs[-1]:.3g} {time.time()-t0:.0f}s", flush=True)
    e = torch.tensor(errs)
    print(f"top1 {agree}/{n} = {agree/n:.4f}; logit max-abs-err per token: median {e.median():.3g} p90 {e.quantile(0.9):.3g} max {e.max():.3g}")
    print(ex.e.stats, ex.e.provider.issued)


if __name__ == "__main__":
    main()
