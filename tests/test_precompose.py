"""v3-2r's precomposition: which steps compose, that composing them is the same function, and
that the composed ring weights are exact integers every party derives identically."""
import pytest
import torch
import torch.nn.functional as F

from conftest import load_tiny_models
from shardlm.models.executor import forward_steps, run_sync
from shardlm.models.plan import Composite
from shardlm.models.reference import Reference
from shardlm.protocols import ring
from shardlm.protocols.units import units_for

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny_models(tmp_path_factory, FAMILIES, 11)


@pytest.mark.parametrize("family", FAMILIES)
def test_composites_pair_each_residual_projection_with_the_next_norm_and_projection(tiny, family):
    plan = tiny[family].plan
    L = plan.config.n_layers
    comps = plan.composites()
    # o with the MLP's input projection in every layer, down with the next layer's q/k/v; the
    # last down meets the final norm and the head, which are not composed
    assert [c.name for c in comps[:3]] == ["layers.0.o+layers.0." + ("gate_up" if family != "gpt2" else "up"),
                                           "layers.0.down+layers.1.qkv", "layers.1.o+layers.1." +
                                           ("gate_up" if family != "gpt2" else "up")]
    assert len(comps) == 2 * L - 1
    units = units_for(plan, "v3-2r")
    # per token: layer 0's q/k/v, the 2L-1 composites, the last down and the head
    assert len(units) == 2 * L + 2
    assert sum(len(u.ops) for u in units.values()) == len(plan.linears)  # every op in exactly one unit


@pytest.mark.parametrize("family", FAMILIES)
def test_precomposed_execution_is_the_same_function_in_float(tiny, family):
    """The executor's precompose path with float products equals the plain plan run."""
    model = tiny[family]
    w = model.weights
    ref = Reference.of(model)

    def linear(ops, x):
        if not isinstance(ops, Composite):
            return [ref.linear(op, x) for op in ops]
        a, res = x  # res already carries first's bias
        first = ref.linear(ops.first, a)
        new_res = res + F.linear(a, w[ops.first.weight])
        return [first] + [F.linear(new_res, w[op.weight] * w[ops.norm.weight]) for op in ops.then]

    ids = [3, 77, 31, 200, 9, 14]
    c1, c2 = ref.new_cache(16), ref.new_cache(16)
    for step in (ids, [5], [6]):
        want = ref.forward(torch.tensor(step), c1, all_logits=True)
        got = run_sync(forward_steps(model.plan, w, torch.tensor(step), c2, ref.rope, fuse=True, all_logits=True,
                                     precompose=True), linear)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
        assert c1.length == c2.length


def test_compose_is_exact_integer_arithmetic_and_independent_of_threads():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(96, 64, generator=g) * torch.rand(96, 1, generator=g)  # rows of different magnitude
    w1 = torch.randn(64, 80, generator=g) * 0.05
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c, scales = ring.compose(*ring.encode_weights(t), w1)
        torch.set_num_threads(2)
        c2, _ = ring.compose(*ring.encode_weights(t), w1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(c, c2)
    assert int(c.abs().max()) <= ring.WMAX and (c.abs().amax(dim=1) > ring.WMAX // 2).all()  # ~23 bits per row
    # they decode to the float product to ~2^-22 of each row's largest entry
    want = t.double() @ w1.double()
    err = (c.double() / scales[:, None] - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert float(err.max()) < 2.0 ** -21


@pytest.mark.parametrize("k", [576, 1536, 4096])
def test_the_integer_product_is_exact_at_its_largest_operands(k):
    bits = ring.compose_bits(k)
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-ring.WMAX, ring.WMAX + 1, (4, k), generator=g)
    b = torch.randint(-(2**bits) + 1, 2**bits, (k, 5), generator=g)
    a[0], b[:, 0] = ring.WMAX, 2**bits - 1  # the worst case: every product at its maximum
    assert torch.equal(ring.exact_int_product(a, b, bits), a @ b)  # int64 matmul: exact, no floats
