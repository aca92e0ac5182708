"""The protocol plug-in contract (party/spec.py) and the catalogue (protocols/registry.py): every
implementation satisfies it, options are declared once and refused where they do not apply."""
from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from shardlm.cli import cli
from shardlm.party import spec as spec_mod
from shardlm.protocols import registry


def test_every_implementation_satisfies_the_contract():
    for s in registry.SPECS:
        impl = s.implementation()
        if s.module is None:
            assert impl is None and s.name == "echo"
            continue
        assert isinstance(impl, spec_mod.Implementation), s.name
        if s.runs_generation:  # it generates text: it has a client, taking exactly its declared options
            import inspect

            params = inspect.signature(impl.client).parameters
            declared = {o.name for o in s.options}
            keyword = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
            assert declared <= keyword, (s.name, declared - keyword)
            assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{s.name} swallows unknown options"
            assert keyword - declared == {"prompt_tokens", "max_tokens", "session_id", "progress"}, (s.name, keyword - declared)


def test_a_spec_that_lacks_the_contract_is_refused():
    broken = spec_mod.ProtocolSpec("broken", private=True, summary="x", module="shardlm.wire.frames")
    with pytest.raises(TypeError, match="does not implement"):
        broken.implementation()


def test_undeclared_options_are_refused_not_dropped():
    v3 = registry.get("v3")
    with pytest.raises(spec_mod.OptionError, match="takes no option triples"):
        v3.resolve_options({"triples": "ot"})
    assert v3.resolve_options({}) == {"embedding_source": "local", "material": None, "verify": False,
                                      "offline_mode": "client", "dealer": None, "dealer_fingerprint": None,
                                      "draft": "none", "draft_len": 4, "reply_bits": "full"}
    with pytest.raises(spec_mod.OptionError, match="not one of"):
        registry.get("v3-mpc").resolve_options({"triples": "nobody"})
    assert registry.get("v3-mpc").resolve_options({"triple_batch": "64"})["triple_batch"] == 64


def test_the_runtime_imports_no_protocol_module():
    # the server and the client runner are handed specs; only the catalogue names modules
    for mod in ("shardlm.party.server", "shardlm.party.run", "shardlm.party.spec"):
        src = importlib.import_module(mod).__loader__.get_source(mod)
        assert "protocols" not in "\n".join(l for l in src.splitlines() if l.startswith(("from", "import")))


def test_bench_entries_take_declared_options_only():
    label, s, opts = registry.parse_entry("v3-mpc:triples=ot:mpc-ranges=narrow")
    assert (label, s.name, opts) == ("v3-mpc:triples=ot:mpc-ranges=narrow", "v3-mpc",
                                     {"triples": "ot", "mpc_ranges": "narrow"})
    with pytest.raises(spec_mod.OptionError, match="OPTION one of embedding_source, material"):
        registry.parse_entry("v3:triples=ot")


@pytest.mark.parametrize("args, flag, takers", [
    (["generate", "-p", "hi", "--protocol", "v3", "--triples", "ot"], "--triples", "v3-mpc"),
    (["generate", "-p", "hi", "--protocol", "plain", "--material", "/tmp/x"], "--material", "v2, v3, v3-2r, v3-mpc"),
    (["chat", "--protocol", "v3-mpc", "--jacobi-block", "4"], "--jacobi-block", "split"),
    (["bench", "--protocol", "plain,v3", "--cc-trust", "sha256:00"], "--cc-trust", "v3-cc"),
])
def test_cli_refuses_an_option_the_protocol_does_not_take(args, flag, takers):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"{flag} is not an option of" in result.output and f"it applies to {takers}" in result.output


def test_cli_refuses_an_unknown_protocol_as_usage():
    result = CliRunner().invoke(cli, ["generate", "-p", "hi", "--protocol", "nosuch"])
    assert result.exit_code == 2 and "unknown protocol 'nosuch'" in result.output
    result = CliRunner().invoke(cli, ["bench", "--protocol", "plain,v3:triples=ot"])
    assert result.exit_code == 2 and "OPTION one of" in result.output


def test_an_ambient_environment_option_applies_only_where_declared(monkeypatch):
    # SHARDLM_CC_TRUST exported for v3-cc must not break a v3 run: usage passes, the run fails
    # later only for want of a server
    monkeypatch.setenv("SHARDLM_CC_TRUST", "sha256:" + "0" * 64)
    result = CliRunner().invoke(cli, ["generate", "-p", "hi", "--protocol", "v3", "--local", "-m", "/nonexistent",
                                      "--json"])
    assert result.exit_code == 1 and "cannot load model" in result.output


def test_help_lists_each_option_once_with_the_protocols_that_take_it():
    out = " ".join(CliRunner().invoke(cli, ["generate", "--help"]).output.split())
    import re

    assert len(re.findall(r"--triples \[", out)) == 1 and "v3-mpc: Beaver triples" in out
    assert "v2, v3, v3-2r: Look token embeddings" in out
