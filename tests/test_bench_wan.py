"""The WAN table's harness (party/bench_wan.py) runs a cell end to end: server, proxy, client processes."""
from conftest import build_tiny
from shardlm.party import bench_wan


def test_one_cell_of_the_wan_table_on_a_tiny_model(tmp_path):
    build_tiny("llama", tmp_path / "llama", seed=5)
    (row,) = bench_wan.run(str(tmp_path / "llama"), ["v3 --reply-bits low"], ["20ms"], ["100mbit"], {"chat": "hi"}, 3)
    assert row["protocol"] == "v3 --reply-bits low" and row["rtt"] == "20ms" and row["load"], row
    assert "error" not in row and row["generated"] == 3, row
    assert row["rounds_per_token"] == 4 * 2 + 1  # v3 on two layers: 4L+1
    # the delay is real: every round trip of a decode step crossed the 20 ms link
    assert 1 / row["decode_tok_s"] >= 0.9 * row["rounds_per_token"] * 0.020, row
    assert row["bytes_down_per_token"] > 0 and row["bytes_per_token"] > row["bytes_down_per_token"]
