"""--verify (protocols/verify.py): the client catches a server that alters any product it returns."""
import json
import threading

import numpy as np
import pytest
import torch
import trio
from click.testing import CliRunner

from conftest import build_tiny
from shardlm.cli import cli
from shardlm.models.load import load_model
from shardlm.models.reference import generate as reference_generate
from shardlm.models.sampling import SamplingParams
from shardlm.party.run import run_generation
from shardlm.protocols import lowbits, masked, registry, ring, units, verify

from support import tls_server

GREEDY = SamplingParams()
BITS = [0, 31, 62, 63]


def _random_matrix(out_dim: int, in_dim: int, seed: int) -> ring.RingMatrix:
    g = torch.Generator().manual_seed(seed)
    return ring.RingMatrix(torch.randint(-ring.WMAX, ring.WMAX + 1, (out_dim, in_dim), generator=g))


def _matrix(kind: str):
    if kind == "fused":
        return _random_matrix(48, 40, 1)
    # a v3-2r composite: [first | cross] on a, T on res (block diagonal)
    return units.ComposedMatrix(_random_matrix(56, 40, 2), _random_matrix(24, 32, 3), [])


def _flip(v: torch.Tensor, row: int, col: int, bit: int) -> torch.Tensor:
    out = v.clone()
    out[row, col] ^= ring._signed64(1 << bit)
    return out


def _ints(W) -> torch.Tensor:
    """The integer matrix (out, in) itself, read back through u = I."""
    return W.left_matmul(torch.eye(W.out_dim, dtype=torch.int64))


def _honest_reply(W, rows: int = 3, log_bound: int = 62):
    """(m, y, W r) for an honest product of inputs as the client encodes them (|W x| < 2^log_bound)."""
    fx = units.FIXED_POINT
    x = torch.randn(rows, W.in_dim, generator=torch.Generator().manual_seed(4))
    x_enc = fx.encode(x, fx.bits_for(float(x.abs().max()), int(_ints(W).abs().sum(1).max()), log_bound))
    r = ring.random_ring(rows, W.in_dim)
    return x_enc - r, W.matmul(x_enc - r), W.matmul(r)


@pytest.mark.parametrize("kind", ["fused", "composite"])
def test_u_w_is_exact_mod_2_64(kind):
    W = _matrix(kind)
    u = verify.secret_rows(3, W.out_dim)
    u[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)  # the extremes
    w_int = _ints(W)
    want = ring.exact_matmul_reference(w_int.t().numpy(), u.to(torch.int64).numpy()).T  # Python integers
    assert np.array_equal(W.left_matmul(u).numpy(), want)
    with pytest.raises(OverflowError):  # beyond what float64 holds exactly
        W.left_matmul(ring.random_ring(1, W.out_dim))
    # and W is the matrix the server multiplies by: W m == m W^T for the server's product
    m = ring.random_ring(2, W.in_dim)
    assert np.array_equal(W.matmul(m).numpy(), ring.exact_matmul_reference(m.numpy(), w_int.numpy()))


@pytest.mark.parametrize("rows", [2, 9])  # a decode step's products and a prefill's: both ways of multiplying
def test_the_check_products_are_exact_mod_2_64(rows):
    a, b = ring.random_ring(rows, 40), verify.secret_rows(verify.K, 40)
    want = ring.exact_matmul_reference(a.numpy(), b.to(torch.int64).numpy())  # Python integers
    assert np.array_equal(verify._ring_products(a, b).numpy(), want)


@pytest.mark.parametrize("kind", ["fused", "composite"])
@pytest.mark.parametrize("col", [0, -1])  # in a composite: the [first | cross] block, then the T block
@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("rows", [2, 9])
def test_one_flipped_bit_of_one_entry_is_caught(kind, col, bit, rows):
    W = _matrix(kind)
    key = verify.setup(W)
    m, y, wr = _honest_reply(W, rows)
    assert verify.check(key, m, y, y + wr) is None  # the honest reply passes
    bad = _flip(y, 1, col, bit)
    reason = verify.check(key, m, bad, bad + wr)
    assert reason is not None and reason.startswith("row 1")
    if bit < 62:  # too small for the bound: only Freivalds can catch it
        assert "Freivalds" in reason


def test_the_bound_alone_catches_bit_63_and_tolerates_the_worst_honest_product():
    """Bit 63 moves an honest entry (|z| < 2^62) out of [-2^62, 2^62): the bound catches it with no
    help from Freivalds (whose single vectors miss it half the time). The largest product the
    encoding allows (x at +-max|x| on the signs of the row with the largest L1) still passes."""
    W = _random_matrix(16, 24, 5)
    w = _ints(W)
    row = int(w.abs().sum(1).argmax())
    fx = units.FIXED_POINT
    m, y = torch.zeros(1, 24, dtype=torch.int64), torch.zeros(1, 16, dtype=torch.int64)
    blind = verify.Key(torch.zeros(1, 16, dtype=torch.int64), torch.zeros(1, 24, dtype=torch.int64))  # u = 0
    for amax in (1.0, 3.7, 1234.5):
        x = torch.sign(w[row]).to(torch.float32)[None] * amax
        z = W.matmul(fx.encode(x, fx.bits_for(amax, W.max_row_l1)))
        assert 2**61 < abs(int(z[0, row])) < 2**62  # close to the edge, inside
        assert verify.check(blind, m, y, z) is None
        reason = verify.check(blind, m, y, _flip(z, 0, row, 63))
        assert reason is not None and "2^62" in reason


def test_in_a_low_bits_reply_the_bound_catches_its_top_bit_and_freivalds_works_mod_2_b():
    """A reply of b bits (protocols/lowbits.py): honest entries sit below 2^(b-2); flipping bit b-1
    leaves the bound, and any other change fails Freivalds mod 2^b; bits above b are not compared."""
    W = _random_matrix(16, 24, 7)
    w, b = _ints(W), 50
    row = int(w.abs().sum(1).argmax())
    fx = units.FIXED_POINT
    x = torch.sign(w[row]).to(torch.float32)[None] * 3.7
    z = W.matmul(fx.encode(x, fx.bits_for(3.7, W.max_row_l1, b - 2)))
    assert 2**(b - 3) < abs(int(z[0, row])) < 2**(b - 2)  # the worst honest product, inside
    blind = verify.Key(torch.zeros(1, 16, dtype=torch.int64), torch.zeros(1, 24, dtype=torch.int64))
    m = torch.zeros(1, 24, dtype=torch.int64)
    assert verify.check(blind, m, torch.zeros(1, 16, dtype=torch.int64), z, b) is None
    reason = verify.check(blind, m, torch.zeros(1, 16, dtype=torch.int64), lowbits.wrap(_flip(z, 0, row, b - 1), b), b)
    assert reason is not None and f"2^{b - 2}" in reason
    m, y, wr = _honest_reply(W, log_bound=b - 2)
    key = verify.setup(W)
    low = torch.bitwise_and(y, (1 << b) - 1)
    assert verify.check(key, m, low, lowbits.wrap(low + wr, b), b) is None
    assert verify.check(key, m, low + (1 << b), lowbits.wrap(low + wr, b), b) is None  # above the window: unseen
    for bit in (0, 17, b - 2):
        bad = _flip(low, 1, 5, bit)
        assert "Freivalds" in verify.check(key, m, bad, lowbits.wrap(bad + wr, b), b)


def test_a_single_secret_vector_misses_valuation_62_a_quarter_of_the_time():
    """The analysis in numbers: one u misses an error 2^62 * odd with probability 2^-(64-62)."""
    W = _random_matrix(8, 8, 6)
    m, y, wr = _honest_reply(W, rows=1)
    bad = y.clone()
    bad[0, 3] += 3 * 2**62 - 2**64  # 3 * 2^62 mod 2^64 as a signed int64
    misses = sum(verify.check(verify.setup(W, k=1), m, bad, y + wr) is None for _ in range(2000))
    assert 400 < misses < 600  # 500 expected; sd 19


def test_keys_are_fresh_per_session_and_uniform_bytes():
    W = _random_matrix(8, 8, 7)
    assert not torch.equal(verify.setup(W).u, verify.setup(W).u)
    counts = np.bincount(verify.secret_rows(20, 4096).numpy().view(np.uint8).ravel(), minlength=256)
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 370  # 255 dof: p < 1e-6 above 370


# -- end to end over TLS: a server that alters one product ---------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    build_tiny("llama", d, seed=3)
    return d


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


TARGET = {"v2": "layers.1.up", "v3": "layers.1.gate_up", "v3-2r": "layers.0.down+layers.1.qkv"}


class _Flipping:
    """A unit's matrix on the server whose third product (a decode step) has one bit flipped in
    its first row's last entry (in a composite: the T block)."""

    def __init__(self, inner, bit: int):
        self.inner, self.bit, self.calls = inner, bit, 0
        self.in_dim, self.out_dim = inner.in_dim, inner.out_dim

    def pack(self) -> bool:
        return self.inner.pack()

    def matmul(self, m):
        y = self.inner.matmul(m)
        self.calls += 1
        return _flip(y, 0, -1, self.bit) if self.calls == 3 else y


def _cheat(monkeypatch, unit: str, bit: int) -> None:
    real = masked._server_matrices

    def cheating(server, variant, progress=None):  # only the server's own table: the client's stays honest
        matrices = dict(real(server, variant, progress))
        matrices[unit] = _Flipping(matrices[unit], bit)
        return matrices
    monkeypatch.setattr(masked, "_server_matrices", cheating)


@pytest.mark.parametrize("protocol", ["v2", "v3", "v3-2r"])
@pytest.mark.parametrize("bit,reply_bits", [(0, "low"), ("top", "low"), (63, "full")])
def test_a_cheating_server_is_caught_and_the_session_closed(model, tmp_path, monkeypatch, protocol, bit, reply_bits):
    if bit == "top":  # the highest bit of a low-bits reply (protocols/lowbits.py), its bit 63
        bit = lowbits.reply_bits([l1 for _, l1 in units.encoding_for(model, protocol)[TARGET[protocol]]]) - 1
        assert bit < 63
    _cheat(monkeypatch, TARGET[protocol], bit)

    async def main():
        async with tls_server(tmp_path, model=model) as (server, cfg):
            with pytest.raises(verify.VerificationError) as e:
                await run_generation(cfg, model, registry.get(protocol), [5, 77, 31, 200], 8, GREEDY,
                                     ignore_eos=True, options={"verify": True, "reply_bits": reply_bits})
            with trio.fail_after(10):  # the server ended the session too
                while server.active:
                    await trio.sleep(0.01)
            return e.value
    err = trio.run(main)
    assert err.unit == TARGET[protocol] and err.code.value == "verification_failed"
    assert str(err).startswith(f"the server's reply for unit {TARGET[protocol]} failed verification")


@pytest.mark.parametrize("protocol", ["v2", "v3", "v3-2r"])
def test_an_honest_server_with_verify_gives_the_same_tokens(model, tmp_path, protocol):
    prompt, n = [5, 77, 31, 200, 9], 12

    async def main():
        async with tls_server(tmp_path, model=model) as (_, cfg):
            return [await run_generation(cfg, model, registry.get(protocol), prompt, n, GREEDY, ignore_eos=True,
                                         options={"verify": v}) for v in (False, True)]
    plain, checked = trio.run(main)
    assert checked.result.token_ids == plain.result.token_ids == reference_generate(model, prompt, n, GREEDY,
                                                                                    stop_ids=())
    out = checked.as_dict()
    assert out["verify"] is True and plain.as_dict()["verify"] is False
    # every masked reply was checked: one per round (all rounds but the handshake's are products)
    assert out["verification"]["replies"] == out["prefill_rounds"] + out["phases"]["decode"]["rounds"]
    assert out["verification"]["k"] == verify.K and out["verification"]["check_ms"] > 0


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["generate", "-p", "hi", "--protocol", "plain", "--verify"],
    ["chat", "--protocol", "split", "--verify"],
    ["bench", "--protocol", "plain,v3-mpc", "--verify"],
])
def test_protocols_that_cannot_verify_refuse_the_flag(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "--verify is not an option of" in result.output and "it applies to v2, v3, v3-2r" in result.output


def test_bench_entries_take_verify_as_a_boolean():
    assert registry.parse_entry("v3:verify=true")[2] == {"verify": True}
    assert registry.parse_entry("v3:verify=0")[2] == {"verify": False}
    result = CliRunner().invoke(cli, ["bench", "--protocol", "v3:verify=maybe"])
    assert result.exit_code == 2 and "not a valid bool" in result.output


def test_the_cli_reports_a_failed_check_in_one_line_and_exits_1(tiny_dir, model, tmp_path, monkeypatch):
    _cheat(monkeypatch, "layers.1.gate_up", 31)
    box, ready = {}, threading.Event()

    def serve():  # the server in its own thread and trio loop; the CLI runs trio in this one
        async def main():
            async with tls_server(tmp_path, model=model) as (_, cfg):
                box.update(cfg=cfg, token=trio.lowlevel.current_trio_token(), stop=trio.Event())
                ready.set()
                await box["stop"].wait()
        trio.run(main)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        cfg = box["cfg"]
        base = ["generate", "-m", str(tiny_dir), "-s", cfg.server, "--tls-fingerprint", cfg.fingerprint,
                "-p", "hello", "--protocol", "v3", "--verify", "--max-tokens", "6"]
        human = CliRunner().invoke(cli, base)
        as_json = CliRunner().invoke(cli, [*base, "--json"])
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(30)
    assert human.exit_code == 1, human.output
    [line] = [l for l in human.stderr.splitlines() if l.startswith("error:")]
    assert line.startswith("error: the server's reply for unit layers.1.gate_up failed verification (row 0")
    assert as_json.exit_code == 1
    err = json.loads(as_json.stdout)
    assert err["code"] == "verification_failed" and "layers.1.gate_up" in err["error"]
