"""v3-mpc on SmolLM2 (two-party simulator, dealer triples): a short teacher-forced slice.

The 200-token figure comes from ``python -m shardlm.protocols.mpc_accuracy 200`` (about 5 s
per token on this machine, too slow for CI)."""
import torch

from shardlm.models.reference import Reference
from shardlm.protocols import mpc
from shardlm.protocols.mpc_accuracy import TEXT


def test_teacher_forced_slice_agrees_with_the_reference(smollm2):
    torch.set_num_threads(1)
    ids = smollm2.tokenizer.encode(TEXT)[:8]
    ref = Reference.of(smollm2)
    cache = ref.new_cache(16)
    ex = mpc.MPCExecutor(smollm2, ranges=mpc.Ranges.wide())
    agree, errs = 0, []
    for t in ids:
        want = ref.forward(torch.tensor([t]), cache)[-1]
        got = ex.forward([t])[-1]
        agree += int(got.argmax()) == int(want.argmax())
        errs.append(float((got - want).abs().max()))
    assert agree >= 7, (agree, errs)
    assert sorted(errs)[len(errs) // 2] < 1.0, errs
    assert ex.e.provider.issued["matmul"] == 2 * 30 * len(ids)
