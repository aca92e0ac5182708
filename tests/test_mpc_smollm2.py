"""v3-mpc on SmolLM2 (two-party simulator, dealer triples, wide ranges) against the plaintext
reference: teacher-forced accuracy over a fixed text, and greedy generation of the demo prompt.

Teacher forcing runs as ONE forward over the whole text with every position's logits revealed
(``all_logits``, simulator only): position i sees exactly the ground-truth prefix, as in i
sequential decode steps, for the cost of a single forward's rounds. Greedy generation is checked
the same way: the MPC next-token argmax along the reference's greedy path must equal that path at
every step, which holds exactly when MPC greedy decoding produces the same tokens (each step
depends only on the prefix, which matches by induction)."""
import pytest
import torch

from shardlm.protocols.mpc.accuracy import TEXT, summary, teacher_forced

N_TEXT = 200      # next-token predictions over the fixed text
FLOOR = 0.995     # the seeds claim 98-99.5% top-1; measured 200/200 (median max |logit err| 0.006)
GREEDY_TOKENS = 20
TIE = 0.15        # reference top-2 gaps below this are ties: about twice the largest logit error seen (0.07)


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # CI's two cores; the simulator's products are large int64 tensors
    yield
    torch.set_num_threads(before)


def test_teacher_forced_top1_over_200_tokens_beats_the_seeds_floor(smollm2):
    ids = smollm2.tokenizer.encode(TEXT)[:N_TEXT + 1]
    assert len(ids) == N_TEXT + 1
    want, got, ex = teacher_forced(smollm2, ids[:-1])
    s = summary(want, got)
    print(s)
    assert s["top1"] >= FLOOR, s
    assert s["err_median"] < 0.05 and s["err_p90"] < 0.1 and s["err_max"] < 0.5, s
    # every disagreement is a near tie of the reference (a protocol bug would miss by whole logits)
    assert all(g < TIE for g in s["gaps_where_different"]), s
    assert ex.e.stats.revealed_elements == N_TEXT * want.shape[-1]


def test_greedy_generation_of_the_demo_prompt_matches_the_reference(smollm2):
    """The demo prompt (`shardlm demo`: "Hello, how are you?" through the chat template), 20 greedy
    tokens. The reference's own first step is a tie: its top two logits differ by 0.0002 (float64
    differs from float32 there), and step 17's by 0.007; no approximate protocol can be held to a
    side of such ties. So: at every step whose reference top-2 gap is at least TIE, v3-mpc's pick
    is the reference's; at a tie it must be one of the tied tokens (and teacher forcing carries
    on along the reference's path)."""
    from shardlm.models.reference import generate
    from shardlm.models.sampling import SamplingParams

    prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": "Hello, how are you?"}])
    path = generate(smollm2, prompt, GREEDY_TOKENS, SamplingParams(temperature=0.0), stop_ids=())
    assert len(path) == GREEDY_TOKENS
    want, got, _ = teacher_forced(smollm2, prompt + path[:-1])
    want, got = want[len(prompt) - 1:], got[len(prompt) - 1:]  # the logits that chose each generated token
    assert want.argmax(-1).tolist() == path  # the one-forward reference is the greedy path
    top2 = want.topk(2, -1)
    ties = (top2.values[:, 0] - top2.values[:, 1]) < TIE
    picks = got.argmax(-1)
    tied_ok = (picks == top2.indices[:, 0]) | (picks == top2.indices[:, 1])
    assert int(ties.sum()) <= 4  # the test still checks most steps exactly (16 of 20 on SmolLM2)
    assert (picks == torch.tensor(path))[~ties].all() and tied_ok[ties].all(), \
        (smollm2.tokenizer.decode(path), smollm2.tokenizer.decode(picks.tolist()), ties.tolist())
