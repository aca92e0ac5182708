"""v3-ot on SmolLM2 against the plaintext reference: teacher-forced top-1 agreement over 200
tokens of a fixed text and the demo prompt's first greedy tokens (the issue's accuracy claims).

The simulator is v3-ot's engine with ideal functionalities (approx_lut.IdealLutEngine): every
table lookup returns the entry the two actual shares select (so the tables' off-by-one bucket
error depends on the sharing as in the protocol), products, comparisons and the multiplexer give
their exact values re-shared; the OT machinery itself is tested by tests/test_lut.py,
tests/test_lut_engine.py and the networked v3-ot tests. Teacher forcing is one forward with every
position's logits revealed, as in tests/test_mpc_smollm2.py (whose docstring says why that checks
greedy decoding step by step)."""
import pytest
import torch

from shardlm.protocols.mpc.accuracy import TEXT, summary, teacher_forced

N_TEXT = 200
FLOOR = 0.99      # the seeds claim 0.98; measured 199/200 (the miss a reference tie of 0.0017)
TIE = 0.3         # reference top-2 gaps below this are ties: about the largest logit error seen
GREEDY_TOKENS = 8


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_teacher_forced_top1_over_200_tokens(smollm2):
    ids = smollm2.tokenizer.encode(TEXT)[:N_TEXT + 1]
    want, got, ex = teacher_forced(smollm2, ids[:-1], "ot")
    s = summary(want, got)
    print(s)
    assert s["top1"] >= FLOOR, s
    assert s["err_median"] < 0.15 and s["err_max"] < 1.0, s
    # a disagreement is a near tie of the reference (a protocol bug would miss by whole logits)
    assert all(g < TIE for g in s["gaps_where_different"]), s
    assert ex.e.lookups > 0  # the nonlinear layers went through the tables


def test_first_greedy_tokens_of_the_demo_prompt(smollm2):
    """The demo prompt's first 8 greedy tokens: v3-ot's pick is the reference's at every step
    whose reference top-2 gap is at least TIE, and one of the two tied tokens otherwise (the
    reference's own first step is a tie of 0.0002, tests/test_mpc_smollm2.py)."""
    from shardlm.models.reference import generate
    from shardlm.models.sampling import SamplingParams

    prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": "Hello, how are you?"}])
    path = generate(smollm2, prompt, GREEDY_TOKENS, SamplingParams(temperature=0.0), stop_ids=())
    want, got, _ = teacher_forced(smollm2, prompt + path[:-1], "ot")
    want, got = want[len(prompt) - 1:], got[len(prompt) - 1:]
    assert want.argmax(-1).tolist() == path
    top2 = want.topk(2, -1)
    ties = (top2.values[:, 0] - top2.values[:, 1]) < TIE
    picks = got.argmax(-1)
    tied_ok = (picks == top2.indices[:, 0]) | (picks == top2.indices[:, 1])
    assert int(ties.sum()) <= 2
    assert (picks == torch.tensor(path))[~ties].all() and tied_ok[ties].all(), \
        (smollm2.tokenizer.decode(path), smollm2.tokenizer.decode(picks.tolist()), ties.tolist())
