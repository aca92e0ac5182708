"""The ideal-product simulator (protocols/mpc/ideal.py) computes what the Beaver engine computes."""
import pytest
import torch

from shardlm.protocols import mpc
from shardlm.protocols.mpc.ideal import IdealEngine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import load_tiny_models

    return load_tiny_models(tmp_path_factory, ("llama", "gpt2"), 3)


def _sharing(eng, x):
    return eng.share(torch.as_tensor(x, dtype=torch.float64))


def test_primitives_give_the_beaver_engines_values_from_the_same_shares():
    real, ideal = mpc.Engine(), IdealEngine()
    x = _sharing(real, torch.linspace(-40, 40, 5001))
    y = _sharing(real, torch.linspace(3, -7, 5001))
    m, n = _sharing(real, torch.randn(3, 4, 5)), _sharing(real, torch.randn(3, 5, 2))
    recon = lambda s: s.c + s.s  # noqa: E731
    for eng in (real, ideal):
        eng.stats = mpc.Stats()
    # truncation from the same shares: the same ring value, including its share-dependent last bit
    k = torch.randint(1, 30, x.shape)
    assert torch.equal(recon(real.trunc(x, k)), recon(ideal.trunc(x, k)))
    (zr,), (zi,) = real.mul_many([(x, y)], truncate=False), ideal.mul_many([(x, y)], truncate=False)
    assert torch.equal(recon(zr), recon(zi))
    assert torch.equal(recon(real.ltz(x)), recon(ideal.ltz(x)))
    (pr,), (pi,) = real.matmul_many([(m, n)], truncate=False), ideal.matmul_many([(m, n)], truncate=False)
    assert torch.equal(recon(pr), recon(pi))
    assert vars(real.stats) == vars(ideal.stats)  # rounds and opened elements counted alike
    # outputs are re-shared: the server's share is uniform, not the value
    z = ideal.mul(x, y)
    assert z.s.float().std() > 1e18 and not torch.equal(z.s, recon(z))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_executor_with_ideal_products_matches_the_beaver_executor(tiny, family):
    from shardlm.models.reference import Reference

    model = tiny[family]
    ref = Reference.of(model)
    want = ref.forward(torch.tensor([5, 77, 31, 200, 9, 14]), ref.new_cache(8), all_logits=True)
    runs = []
    for eng in (mpc.Engine(), IdealEngine()):
        ex = mpc.MPCExecutor(model, eng, ranges=mpc.Ranges.wide())
        runs.append((ex.forward([5, 77, 31, 200, 9], all_logits=True), ex.forward([14])))
        runs[-1] += (vars(eng.stats),)
    (real_pre, real_dec, real_stats), (ideal_pre, ideal_dec, ideal_stats) = runs
    assert real_stats == ideal_stats  # the same schedule of rounds and openings
    for real, ideal, w in ((real_pre, ideal_pre, want[:5]), (real_dec, ideal_dec, want[5:])):
        assert (real - w).abs().max() < 1e-2 and (ideal - w).abs().max() < 1e-2
        assert (real - ideal).abs().max() < 5e-3
        assert torch.equal(real.argmax(-1), ideal.argmax(-1))
