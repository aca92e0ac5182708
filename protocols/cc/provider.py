"""Confidential-computing providers: who signs attestation reports, and how much that means.

The interface follows the seeds' ``ConfidentialCompute`` trait (availability, name,
attestation, verification, sealing), minus what they got wrong: there is no "software
AES-GCM fallback" that pretends to be hardware. A provider that is not available raises
:class:`ProviderUnavailable` naming what is missing; nothing falls back silently.

- ``software``: an Ed25519 signing key held by the server process, kept in
  ``$SHARDLM_HOME/cc/software-ed25519.key`` (created on first use, mode 0600) or read from a
  file given with ``serve --cc-key``. Clients pin its public key (or the key's fingerprint,
  printed by ``serve`` and shown by ``info``). The enclave is ordinary process memory, so this
  is a *simulated* TEE (see :data:`shardlm.protocols.cc.SIMULATED_NOTE`).
- ``nvidia``: the GPU's confidential-computing mode (H100 and later). It needs a GPU in CC
  mode (``nvidia-smi conf-compute``) and NVIDIA's attestation SDK to produce evidence a client
  can check against NVIDIA's certificate chain. Where any of that is missing it refuses,
  saying which part.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import nacl.exceptions
import nacl.secret
import nacl.signing
import nacl.utils

from . import SIMULATED_NOTE


class ProviderUnavailable(RuntimeError):
    """The requested provider cannot run here; the message names what is missing."""


def key_fingerprint(public_key: bytes) -> str:
    """How a signing key is pinned: ``sha256:<hex>`` of its 32 raw bytes."""
    return "sha256:" + hashlib.sha256(bytes(public_key)).hexdigest()


class Provider:
    """Availability, name, attestation (sign), verification, sealing."""

    name: str = "?"
    simulated: bool = True
    note: str = ""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here, why not)."""
        raise NotImplementedError

    @property
    def public_key(self) -> bytes:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        raise NotImplementedError

    @staticmethod
    def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
        try:
            nacl.signing.VerifyKey(bytes(public_key)).verify(bytes(message), bytes(signature))
            return True
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
            return False

    def seal(self, data: bytes) -> bytes:
        """Encrypt data for this provider's own storage (not used on the wire)."""
        raise NotImplementedError

    def unseal(self, blob: bytes) -> bytes:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"provider": self.name, "simulated": self.simulated, "note": self.note,
                "public_key": bytes(self.public_key).hex(), "key_fingerprint": self.fingerprint}


class SoftwareProvider(Provider):
    name = "software"
    simulated = True
    note = SIMULATED_NOTE

    def __init__(self, signing_key: nacl.signing.SigningKey):
        self._key = signing_key
        # sealing key derived from the signing seed, domain-separated
        self._seal_key = hashlib.blake2b(bytes(signing_key), digest_size=32, person=b"shardlm-cc-seal").digest()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def load(cls, key_file: str | os.PathLike | None = None) -> "SoftwareProvider":
        """From ``key_file`` (32-byte seed, raw or hex), or the one in $SHARDLM_HOME/cc (made if missing)."""
        if key_file is not None:
            path = Path(key_file)
            if not path.is_file():
                raise ProviderUnavailable(f"software CC key file {path} does not exist")
            return cls(nacl.signing.SigningKey(_read_seed(path)))
        from ...models.fetch import shardlm_home

        path = shardlm_home() / "cc" / "software-ed25519.key"
        if path.is_file():
            return cls(nacl.signing.SigningKey(_read_seed(path)))
        path.parent.mkdir(parents=True, exist_ok=True)
        key = nacl.signing.SigningKey.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bytes(key).hex() + "\n")
        os.replace(tmp, path)
        return cls(key)

    @property
    def public_key(self) -> bytes:
        return bytes(self._key.verify_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(bytes(message)).signature

    def seal(self, data: bytes) -> bytes:
        return bytes(nacl.secret.SecretBox(self._seal_key).encrypt(bytes(data)))

    def unseal(self, blob: bytes) -> bytes:
        return nacl.secret.SecretBox(self._seal_key).decrypt(bytes(blob))


def _read_seed(path: Path) -> bytes:
    data = path.read_bytes()
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    if len(data) == 32:
        return data
    raise ProviderUnavailable(f"{path}: expected an Ed25519 seed (32 bytes, raw or 64 hex digits)")


class NvidiaProvider(Provider):
    """GPU confidential computing. Evidence must come from the GPU and be checked against
    NVIDIA's certificate chain; this build has no path to produce it without the hardware and
    NVIDIA's attestation SDK, so :meth:`create` refuses where either is missing."""

    name = "nvidia"
    simulated = False
    note = "hardware TEE: NVIDIA GPU confidential computing"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return False, ("nvidia-smi not found on PATH: no NVIDIA driver, so no GPU whose confidential-computing "
                           "mode could be attested")
        try:
            out = subprocess.run([smi, "conf-compute", "-f"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"`nvidia-smi conf-compute -f` failed: {exc}"
        text = (out.stdout + out.stderr).strip()
        if out.returncode != 0:
            return False, f"`nvidia-smi conf-compute -f` exited {out.returncode}: {text or 'no output'}"
        if "ON" not in text.upper().split():
            return False, f"GPU confidential-computing mode is not on (`nvidia-smi conf-compute -f`: {text!r})"
        try:
            import nv_attestation_sdk  # noqa: F401
        except ImportError:
            return False, ("GPU CC mode is on, but NVIDIA's attestation SDK (python package nv_attestation_sdk) "
                           "is not installed, so no verifiable GPU evidence can be produced")
        return False, "GPU evidence collection through nv_attestation_sdk is not implemented in this build"

    @classmethod
    def create(cls) -> "NvidiaProvider":
        ok, why = cls.available()
        if not ok:
            raise ProviderUnavailable(f"nvidia CC provider unavailable: {why}. Not falling back to the simulated "
                                      f"software provider; pass --cc-provider software explicitly to use it.")
        raise AssertionError("unreachable")


PROVIDERS = ("software", "nvidia")


def get_provider(name: str = "software", key_file: str | None = None) -> Provider:
    if name == "software":
        return SoftwareProvider.load(key_file)
    if name == "nvidia":
        return NvidiaProvider.create()
    raise ProviderUnavailable(f"unknown CC provider {name!r}; choose from {', '.join(PROVIDERS)}")
