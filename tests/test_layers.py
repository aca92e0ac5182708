"""The layer rules in pyproject ([tool.importlinter]) hold, and would catch a breach."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")  # import-linter's command, in the test extra


def _lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([LINT, str(config), "--no-cache", "--no-logo"], capture_output=True, text=True, env=env,
                          cwd=package_parent, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    """The package's sources under tmp_path/shardlm, so a breach can be planted in a copy."""
    dest = tmp_path / "shardlm"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "__pycache__", "*.egg-info",
                                                              "build"))
    return dest


def test_the_layer_contracts_are_kept(tmp_path):
    pkg = _copy_tree(tmp_path)
    out = _lint(tmp_path, pkg / "pyproject.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken" in out.stdout


def test_a_planted_upward_import_and_a_cycle_are_caught(tmp_path):
    pkg = _copy_tree(tmp_path)
    with open(pkg / "wire/frames.py", "a") as f:  # wire reaching up into the protocols
        f.write("\nfrom ..protocols import registry  # noqa\n")
    with open(pkg / "models/plan.py", "a") as f:  # plan <-> load
        f.write("\nfrom . import load  # noqa\n")
    out = _lint(tmp_path, pkg / "pyproject.toml")
    assert out.returncode == 1
    assert "shardlm.wire is not allowed to import shardlm.protocols" in out.stdout
    assert "No cycles are allowed in shardlm.models" in out.stdout
