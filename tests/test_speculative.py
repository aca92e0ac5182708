"""Speculative decoding (party/speculative): greedy output equal to sequential greedy and the
reference over TLS for every protocol that verifies several rows, the sequential distribution
under sampling (chi-square, and the same test failing on wrong acceptance rules), the server's
view (K+1 rows in every decode forward; --pad-to-max hides the number of forwards) and the
capacity the server holds a drafting client to."""
import itertools
import math

import numpy as np
import pytest
import torch
import trio

from conftest import load_tiny_models
from shardlm.models.reference import Reference, generate as reference_generate
from shardlm.models.sampling import SamplingParams, probabilities, sample
from shardlm.party import run as run_module, speculative
from shardlm.party.client import connect
from shardlm.party.drafting import MAX_DRAFT_LEN, Drafter, Drafting, lookup, session_rows
from shardlm.party.generation import generate as sequential_generate
from shardlm.party.run import run_generation
from shardlm.party.transcript import load_transcript, session_dirs
from shardlm.protocols import registry
from shardlm.protocols.units import units_for
from shardlm.wire.errors import RemoteError
from shardlm.wire.msgtypes import MsgType

from support import tls_server

GREEDY = SamplingParams()
FAMILIES = ["llama", "qwen2", "gpt2"]
LOW = [5, 77, 31, 200, 9, 14, 150]  # a prompt whose continuation the drafts rarely predict


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    three = {fam: {"n_layer": 3} if fam == "gpt2" else {"num_hidden_layers": 3} for fam in FAMILIES}  # split: k=1
    return load_tiny_models(tmp_path_factory, FAMILIES, 3, three)


class InProcess:
    """The plaintext reference as a client of the decoding loops, in this process: many draws quickly."""

    def __init__(self, model):
        self.ref = Reference.of(model)

    def new_cache(self, capacity):
        self.cache = self.ref.new_cache(capacity)

    async def forward(self, ids):
        return self.ref.forward(torch.tensor(ids), self.cache)[-1]

    async def forward_rows(self, ids):
        return self.ref.forward(torch.tensor(ids), self.cache, all_logits=True)

    def rollback(self, length):
        self.cache.truncate(length)


def _local(model, prompt, n, sampling, drafting):
    return trio.run(speculative.generate, InProcess(model), prompt, n, sampling, (), drafting)


_REPETITIVE: dict = {}


def repetitive_prompt(model) -> list[int]:
    """Of a few repetitive prompts, the one whose greedy continuation lookup drafts predict best
    (a random tiny model does not copy its prompt; some prompts send it into a loop)."""
    if id(model) in _REPETITIVE:
        return _REPETITIVE[id(model)]
    candidates = [[a, b] * 3 for a, b in itertools.product(range(11, 300, 37), range(3, 300, 59))]
    rate = {tuple(p): _local(model, p, 16, GREEDY, Drafting("lookup", 4)).drafting["tokens_per_forward"]
            for p in candidates}
    return _REPETITIVE.setdefault(id(model), list(max(rate, key=rate.get)))


def test_lookup_and_drafts_fill_a_fixed_number_of_rows():
    assert lookup([1, 2, 3, 9, 1, 2, 3], 4) == [9, 1, 2, 3]  # after the latest earlier "1 2 3"
    assert lookup([7, 8, 9], 3) == []
    d = Drafter(Drafting("lookup", 5))
    assert d.draft([1, 2, 3, 9, 1, 2, 3]) == [9, 1, 2, 3, 3]  # padded to K
    j = Drafter(Drafting("jacobi", 3))
    assert j.draft([4, 5, 6]) == [6, 6, 6]  # a fresh block repeats the last token
    j.update(torch.eye(10)[[1, 2, 7, 8]], kept=1)  # rows after the kept draft: their predictions
    assert j.draft([4, 5, 6, 2]) == [7, 8, 8]
    assert session_rows(10, 20, Drafting()) == 30 and session_rows(10, 20, Drafting("lookup", 3)) == 10 + 20 + 19 * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_drafts_equals_sequential_greedy_and_the_reference(models, tmp_path, family):
    """plain, v3, v3-2r and split (v2 on llama) over TLS, lookup drafts (Jacobi too on v3 and v3-2r: the
    draft kind is the client's business, the same for every protocol), on a prompt with a high
    acceptance rate and one with a low rate: the reference's tokens (which sequential decoding
    gives: tests/test_masked, test_split; v3 here too); the rounds of a forward as without drafts;
    on the repetitive prompt, more than 1.5 tokens per forward and fewer rounds than sequential."""
    model = models[family]
    high = repetitive_prompt(model)
    n, L = 16, model.config.n_layers
    rounds = {"plain": 1, "split": 1, "v2": 7 * L + 1, "v3": 4 * L + 1, "v3-2r": 2 * L + 2}
    runs = [(proto, label, kind) for proto in ["plain", "v3", "v3-2r", "split"] for label in ("high", "low")
            for kind in ("lookup", "jacobi") if kind == "lookup" or proto in ("v3", "v3-2r")]
    runs += [("v3", "high", "none")] + [("v2", "high", "lookup")] * (family == "llama")

    async def main():
        out = {}
        async with tls_server(tmp_path, model=model) as (server, cfg):
            for proto, label, kind in runs:
                options = {"draft": kind, "draft_len": 4} | ({"split_layers": 1} if proto == "split" else {})
                out[proto, label, kind] = await run_generation(cfg, model, registry.get(proto),
                                                               high if label == "high" else LOW, n, GREEDY,
                                                               ignore_eos=True, options=options)
        return out

    reports = trio.run(main)
    want = {"high": reference_generate(model, high, n, GREEDY, stop_ids=()),
            "low": reference_generate(model, LOW, n, GREEDY, stop_ids=())}
    for (proto, label, kind), rep in reports.items():
        assert rep.result.token_ids == want[label], (proto, label, kind)
        forwards = n - 1 if kind == "none" else rep.result.drafting["decode_forwards"]
        assert rep.stats["decode"]["rounds"] == forwards * rounds[proto], (proto, label, kind)
        if kind != "none":
            d = rep.as_dict()["drafting"]
            assert d["rows_per_forward"] == 5 and d["decode_tokens"] == n - 1
    for proto in rounds if family == "llama" else ["plain", "v3", "v3-2r", "split"]:
        assert reports[proto, "high", "lookup"].result.drafting["tokens_per_forward"] > 1.5, proto
    decode_rounds = {kind: reports["v3", "high", kind].stats["decode"]["rounds"] for kind in ("lookup", "none")}
    assert decode_rounds["lookup"] < decode_rounds["none"]


# -- sampling: the sequential distribution -----------------------------------------------------------
def _exact_first_tokens(model, prompt, params, n):
    """P(first n tokens) of sequential sampling, by enumeration over the tokens top-k leaves."""
    ref = Reference.of(model)
    out = {}

    def walk(prefix, prob):
        if len(prefix) == n:
            out[tuple(prefix)] = prob
            return
        p = probabilities(ref.forward(torch.tensor(prompt + prefix), ref.new_cache(64))[-1], params)
        for tok in torch.nonzero(p).flatten().tolist():
            walk(prefix + [tok], prob * float(p[tok]))
    walk([], 1.0)
    return out


def _chi_square_p(counts: dict, exact: dict, draws: int) -> float:
    """Goodness of fit of ``counts`` to ``exact`` (cells with expected < 5 pooled): the p-value,
    by the Wilson-Hilferty normal approximation of the chi-square tail."""
    cells, pooled_exp, pooled_obs = [], 0.0, 0
    for seq, p in exact.items():
        if p * draws < 5:
            pooled_exp, pooled_obs = pooled_exp + p * draws, pooled_obs + counts.get(seq, 0)
        else:
            cells.append((counts.get(seq, 0), p * draws))
    cells.append((pooled_obs + sum(c for s, c in counts.items() if s not in exact), max(pooled_exp, 1e-9)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    k = len(cells) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _always_accept(logits, drafts, params, generator):
    return list(drafts) + [sample(logits[len(drafts)], params, generator)], len(drafts)


def _resample_from_p(logits, drafts, params, generator):
    """Keeps a draft with probability p(x) but on rejection draws from p itself (x not removed)."""
    for j, x in enumerate(drafts):
        p = probabilities(logits[j], params)
        if float(torch.rand((), generator=generator)) >= float(p[x]):
            return list(drafts[:j]) + [sample(logits[j], params, generator)], j
    return list(drafts) + [sample(logits[len(drafts)], params, generator)], len(drafts)


def _sampled_fit(model, monkeypatch, rule=None, drafting=Drafting("lookup", 2), draws=300):
    params = dict(temperature=1.0, top_k=3)
    prompt = repetitive_prompt(model)[:5]  # lookup drafts the alternation; the model often disagrees
    exact = _exact_first_tokens(model, prompt, SamplingParams(**params), 3)
    if rule is not None:
        monkeypatch.setattr(speculative, "verify", rule)
    client = InProcess(model)

    async def draw_all():
        counts, kept = {}, 0
        for seed in range(draws):
            sampling = SamplingParams(**params, seed=seed)
            if drafting.on:
                r = await speculative.generate(client, prompt, 3, sampling, (), drafting)
                kept += r.drafting["drafts_kept"]
            else:
                r = await sequential_generate(client, prompt, 3, sampling, ())
            counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        return counts, kept
    counts, kept = trio.run(draw_all)
    return _chi_square_p(counts, exact, draws), kept


def test_sampled_output_has_the_sequential_distribution(models, monkeypatch):
    """Temperature 1, top-k 3, the first 3 tokens (27 sequences) of 300 seeded draws: speculative
    sampling with lookup drafts, and sequential sampling, fit the exact sequential distribution
    (p > 0.001); drafts were kept often (the acceptance rule was exercised)."""
    model = models["llama"]
    p_seq, _ = _sampled_fit(model, monkeypatch, drafting=Drafting())
    p_spec, kept = _sampled_fit(model, monkeypatch)
    assert min(p_seq, p_spec) > 1e-3, (p_seq, p_spec)
    assert kept > 100


@pytest.mark.parametrize("rule", [_always_accept, _resample_from_p])
def test_the_distribution_check_fails_on_a_wrong_acceptance_rule(models, monkeypatch, rule):
    p, _ = _sampled_fit(models["llama"], monkeypatch, rule, draws=150)
    assert p < 1e-6


# -- the server's view and its limits ----------------------------------------------------------------
def _forwards(msgs, n_units):
    """A recorded v3 session's MASKED_LINEAR requests, grouped per forward (each visits every unit once)."""
    lin = [m for m in msgs if m.type == MsgType.MASKED_LINEAR]
    assert len(lin) % n_units == 0
    return [lin[i:i + n_units] for i in range(0, len(lin), n_units)]


def _record(model, tmp_path, prompts, options, pad_to_max=False, n=12):
    rec = tmp_path / f"rec{len(list(tmp_path.iterdir()))}"

    async def main():
        async with tls_server(tmp_path, model=model, record_dir=str(rec)) as (server, cfg):
            return [await run_generation(cfg, model, registry.get("v3"), p, n, GREEDY, ignore_eos=True,
                                         options=options, pad_to_max=pad_to_max) for p in prompts]
    reports = trio.run(main)
    return reports, [load_transcript(d)[1] for d in session_dirs(rec)]


def test_every_decode_forward_carries_k_plus_1_rows_and_pad_to_max_hides_the_forward_count(models, tmp_path,
                                                                                          monkeypatch):
    model = models["llama"]
    n_units = len(units_for(model.plan, "v3"))
    high, K = repetitive_prompt(model), 3
    prompts = [high, LOW[:len(high)]]  # equal lengths
    options = {"draft": "lookup", "draft_len": K}
    reports, views = _record(model, tmp_path, prompts, options)
    counts = []
    for msgs in views:
        prefill, *decode = _forwards(msgs, n_units)
        assert {m.body["m"].shape[0] for f in decode for m in f} == {K + 1}
        counts.append(len(decode))
    # the leak --pad-to-max exists for: how predictable the text was shows in the number of forwards
    assert counts[0] < counts[1] and [r.result.drafting["decode_forwards"] for r in reports] == counts
    reports, views = _record(model, tmp_path, prompts, options, pad_to_max=True)

    def shape_of(msgs):
        return [(m.type, m.body.get("unit"), getattr(m.body.get("m"), "shape", None), m.frame_bytes) for m in msgs]
    assert shape_of(views[0]) == shape_of(views[1])
    assert len(_forwards(views[0], n_units)) == 1 + 11  # the prefill, then max_tokens - 1 forwards
    assert [r.result.token_ids for r in reports] == [reference_generate(model, p, 12, GREEDY, stop_ids=())
                                                     for p in prompts]

    # a drafter that sends only the drafts it has (no padding): the rows per forward vary, the check sees it
    unpadded = Drafter.draft
    monkeypatch.setattr(Drafter, "draft", lambda self, ctx: unpadded(self, ctx)[:len(lookup(ctx, self.d.length))])
    _, views = _record(model, tmp_path, [LOW], options)
    rows = {m.body["m"].shape[0] for f in _forwards(views[0], n_units)[1:] for m in f}
    assert rows != {K + 1}


def test_the_server_refuses_rows_beyond_the_session_capacity(models, tmp_path, monkeypatch):
    """A drafting client that asks for the capacity of a generation without drafts is cut off when its
    K+1-row forwards pass it; the head takes at most MAX_DRAFT_LEN + 1 rows per request; a plain
    client cannot buy forwards by rolling back."""
    model = models["llama"]
    head = next(u for u in units_for(model.plan, "v3").values() if u.head)

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            options = {"draft": "jacobi", "draft_len": 7}
            ok = await run_generation(cfg, model, registry.get("v3"), LOW, 30, GREEDY, ignore_eos=True, options=options)
            monkeypatch.setattr(run_module, "session_rows", lambda prompt, n, d: prompt + n)
            with pytest.raises(RemoteError) as e:
                await run_generation(cfg, model, registry.get("v3"), LOW, 30, GREEDY, ignore_eos=True, options=options)
            assert e.value.code == "seq_too_long" and "capacity of 64" in str(e.value)
            async with connect(cfg) as conn:
                await conn.open_session("v3", model.fingerprint(), 64)
                with pytest.raises(RemoteError) as e:
                    await conn.channel.request(MsgType.MASKED_LINEAR, {
                        "unit": head.name, "m": np.zeros((MAX_DRAFT_LEN + 2, head.in_dim), np.int64)},
                        MsgType.MASKED_LINEAR_OK)
                assert e.value.code == "seq_too_long"
            async with connect(cfg) as conn:
                await conn.open_session("plain", model.fingerprint(), 64)
                body = {"ids": np.arange(40, dtype=np.int64), "start": 0, "all_rows": True}
                await conn.channel.request(MsgType.PLAIN_FORWARD, body, MsgType.PLAIN_LOGITS)
                with pytest.raises(RemoteError) as e:
                    await conn.channel.request(MsgType.PLAIN_FORWARD, body, MsgType.PLAIN_LOGITS)
                assert e.value.code == "seq_too_long"
            return ok
    ok = trio.run(main)
    assert ok.result.token_ids == reference_generate(model, LOW, 30, GREEDY, stop_ids=())


EDIT = ("Rewrite this paragraph, changing only 'cat' to 'dog':\n\nThe cat sat on the mat by the door. "
        "Every morning the cat watched the birds in the garden, and every evening the cat slept by the fire.")


@pytest.mark.slow
def test_smollm2_v3_with_lookup_drafts_equals_the_reference(smollm2, tmp_path):
    """An edit prompt (high acceptance): v3 with lookup drafts over TLS, token for token the reference."""
    prompt = smollm2.tokenizer.encode_chat([{"role": "user", "content": EDIT}])
    n = 10
    want = reference_generate(smollm2, prompt, n, GREEDY, stop_ids=())

    async def main():
        async with tls_server(tmp_path, model=smollm2) as (server, cfg):
            return await run_generation(cfg, smollm2, registry.get("v3"), prompt, n, GREEDY, ignore_eos=True,
                                        options={"draft": "lookup", "draft_len": 4})
    rep = trio.run(main)
    assert rep.result.token_ids == want
    assert rep.result.drafting["tokens_per_forward"] > 1.5
