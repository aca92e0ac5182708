"""v3-ot's (or v3-mpc's with OT triples) cost per forward in the two-party simulator: both
parties' OT traffic, rounds, table lookups, CPU time (both parties on this process's threads).

    SHARDLM_HOME=... python -m shardlm.protocols.mpc.cost [PROMPT_TOKENS] [DECODE_TOKENS] [ot|mpc-ot]

A measurement of where the bytes go, without TLS or a second process; the networked figures
come from ``shardlm bench`` (README, v3-ot).
"""
import sys
import time

import torch

from ...models.load import load_model
from . import beaver_ot
from .approx_lut import LutEngine
from .engine import Engine
from .executor import MPCExecutor, Ranges


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    decode = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    kind = sys.argv[3] if len(sys.argv) > 3 else "ot"
    torch.set_num_threads(1)
    model = load_model("smollm2")
    e = {"ot": LutEngine, "mpc-ot": Engine}[kind](beaver_ot.OTProvider(batch=1 << 14, prefill_and=True))
    ex = MPCExecutor(model, e, ranges=Ranges.wide())
    ids = model.tokenizer.encode("The history of the printing press begins in the fifteenth century")[:n]
    p = e.provider
    for step, toks in enumerate([ids] + [[42 + i] for i in range(decode)]):
        b0, r0, l0, t0 = p.ot_bytes, e.stats.rounds, getattr(e, "lookups", 0), time.time()
        lb0 = getattr(e, "lookup_bytes", 0)
        ex.forward(toks)
        print(f"forward {step} ({len(toks)} tokens): {(p.ot_bytes - b0) / 1e6:.1f} MB of OT both ways, "
              f"{e.stats.rounds - r0} rounds, {getattr(e, 'lookups', 0) - l0} lookups "
              f"({(getattr(e, 'lookup_bytes', 0) - lb0) / 1e6:.1f} MB), {time.time() - t0:.1f} s", flush=True)
    print("triples issued:", dict(p.issued), "elements:", dict(p.elements))


if __name__ == "__main__":
    main()
