"""Attestation reports: what the enclave signs, and every check the client makes before it
sends anything private.

A report (msgpack, canonical key order) holds the provider, the *measurement* (a hash over
the shardlm version, the enclave's code and the model weights' digest, with the three parts
listed beside it), the enclave's ephemeral X25519 public key, the client's X25519 public key
and fresh nonce it answers, the session id and a timestamp. The provider signs
``DOMAIN || report`` with Ed25519.

The client (:func:`verify_report`) checks, in order, and refuses naming the first failure:
the signing key is the pinned one, the signature, the nonce is the one it just sent, the
report is bound to its own key exchange key, the timestamp is within the freshness window,
and the measurement equals the one it computes from its own version, code and model files.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import time
from pathlib import Path

import msgpack

from ... import __version__
from ...wire.errors import ErrorCode, ProtocolError
from .provider import Provider, key_fingerprint

FORMAT = "shardlm-cc-report/v1"
DOMAIN = b"shardlm-cc-report/v1\0"
FRESHNESS_WINDOW_S = 120.0
NONCE_BYTES = 32

_ROOT = Path(__file__).resolve().parents[2]  # the shardlm package directory
# What runs inside the boundary: the server process that hosts the enclave (its connection
# handling and wire code), the v3-cc handler, enclave and channel, model loading and the
# forward, and every shardlm module these import, at any depth (enclave_sources). Python,
# torch and numpy are not measured: a real TEE measures them as part of the VM image.
ENCLAVE_ROOTS = ("party/server.py", "protocols/cc/service.py", "models/load.py")


def _imports(rel: str, root: Path) -> set[str]:
    """The shardlm modules ``rel`` imports (anywhere in it: lazy imports too), as paths."""
    tree = ast.parse((root / rel).read_bytes())
    here = Path(rel).parent
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here
                for _ in range(node.level - 1):
                    base = base.parent
            elif (node.module or "").startswith("shardlm"):
                base = Path(".")
                node = ast.ImportFrom(module=node.module[len("shardlm"):].lstrip(".") or None, names=node.names)
            else:
                continue
            mod = base.joinpath(*node.module.split(".")) if node.module else base
            candidates = [mod] + [mod / a.name for a in node.names]  # `from . import aead` names a module
        elif isinstance(node, ast.Import):
            candidates = [Path(*a.name.split(".")[1:]) for a in node.names if a.name.startswith("shardlm.")]
        else:
            continue
        for c in candidates:
            for f in ((c.parent / f"{c.name}.py") if c.name else c, c / "__init__.py"):
                if (root / f).is_file():
                    out.add(f.as_posix())
    return out


def enclave_sources(root: Path = _ROOT) -> tuple[str, ...]:
    """Every module on the enclave's path: the roots and their shardlm imports, transitively,
    with the __init__ of each package they sit in."""
    seen, todo = set(), list(ENCLAVE_ROOTS)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo.extend(_imports(rel, root))
        for parent in Path(rel).parents:
            init = (parent / "__init__.py").as_posix()
            if (root / init).is_file():
                todo.append(init)
    return tuple(sorted(seen))


class AttestationError(ProtocolError):
    """The client refuses the server's attestation; ``check`` names the failed check."""

    def __init__(self, check: str, message: str):
        super().__init__(ErrorCode.ATTESTATION_FAILED, f"attestation check '{check}' failed: {message}; "
                                                       f"refusing to send anything private")
        self.check = check


def code_digest(root: Path = _ROOT) -> str:
    h = hashlib.sha256(b"shardlm-cc-code/v1\0")
    for rel in enclave_sources(root):
        data = (root / rel).read_bytes()
        h.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    return "sha256:" + h.hexdigest()


def measurement_of(components: dict) -> str:
    h = hashlib.sha256(b"shardlm-cc-measurement/v1\0")
    for k in ("version", "code", "model"):
        h.update(f"{k}={components[k]}\0".encode())
    return "sha256:" + h.hexdigest()


def local_components(model_fingerprint: str) -> dict:
    """The measurement parts this process computes from its own version, code and model."""
    return {"version": __version__, "code": code_digest(), "model": model_fingerprint}


@dataclasses.dataclass(frozen=True)
class SignedReport:
    report: bytes     # canonical msgpack of the fields
    signature: bytes  # Ed25519 over DOMAIN || report
    signer: bytes     # the provider's Ed25519 public key

    def as_body(self) -> dict:
        return {"report": self.report, "signature": self.signature, "signer": self.signer}

    @classmethod
    def from_body(cls, body: dict) -> "SignedReport":
        try:
            return cls(bytes(body["report"]), bytes(body["signature"]), bytes(body["signer"]))
        except (KeyError, TypeError) as exc:
            raise AttestationError("format", f"the attestation reply lacks report/signature/signer ({exc})") from None

    def fields(self) -> dict:
        try:
            out = msgpack.unpackb(self.report, raw=False)
        except Exception as exc:
            raise AttestationError("format", f"the report does not decode: {exc}") from None
        if not isinstance(out, dict) or out.get("format") != FORMAT:
            raise AttestationError("format", f"not a {FORMAT} report")
        return out


def make_report(provider: Provider, *, components: dict, enclave_key: bytes, client_key: bytes, nonce: bytes,
                session_id: str, timestamp: float | None = None) -> SignedReport:
    fields = {
        "format": FORMAT, "provider": provider.name, "simulated": provider.simulated, "note": provider.note,
        "measurement": measurement_of(components), "components": dict(components),
        "enclave_key": bytes(enclave_key), "client_key": bytes(client_key), "nonce": bytes(nonce),
        "session_id": session_id, "timestamp": float(time.time() if timestamp is None else timestamp),
    }
    report = msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)
    return SignedReport(report, provider.sign(DOMAIN + report), bytes(provider.public_key))


# -- trust pins ------------------------------------------------------------------------------------
def parse_trust(text: str) -> tuple[str, object]:
    """``--cc-trust``: ``sha256:<hex>`` (key fingerprint), ``ed25519:<hex>`` or bare 64 hex digits
    (the public key itself), or a file holding one of these. Returns ("fingerprint", str) or
    ("key", bytes)."""
    value = (text or "").strip()
    if value and os.path.isfile(value):
        value = Path(value).read_text().strip()
    low = value.lower()
    if low.startswith("sha256:"):
        hexpart = low[7:]
        if len(hexpart) == 64 and _is_hex(hexpart):
            return "fingerprint", "sha256:" + hexpart
    else:
        hexpart = low[8:] if low.startswith("ed25519:") else low
        if len(hexpart) == 64 and _is_hex(hexpart):
            return "key", bytes.fromhex(hexpart)
    raise ValueError(f"bad --cc-trust value {text!r}: expected sha256:<64 hex> (the key fingerprint printed by "
                     f"`shardlm serve`), ed25519:<64 hex> (the public key), or a file holding one")


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def trusts(pin: tuple[str, object], signer: bytes) -> bool:
    kind, value = pin
    return key_fingerprint(signer) == value if kind == "fingerprint" else bytes(signer) == value


def pin_text(pin: tuple[str, object]) -> str:
    kind, value = pin
    return value if kind == "fingerprint" else "ed25519:" + bytes(value).hex()


# -- the client's checks ---------------------------------------------------------------------------
def verify_report(signed: SignedReport, *, pin: tuple[str, object] | None, nonce: bytes, client_key: bytes,
                  expected: dict, now: float | None = None, window: float = FRESHNESS_WINDOW_S,
                  session_id: str | None = None) -> dict:
    """Return the report's fields if every check passes; raise :class:`AttestationError` naming
    the first that fails. ``session_id``: the session the report must be bound to (HELLO_OK's).

    Whether the TEE is simulated is the client's call, not the server's: a report is taken as
    simulated unless vendor evidence was verified, and this client verifies none (no GPU
    confidential-computing verifier is built), so a report claiming ``simulated=False`` is refused
    rather than believed."""
    if pin is None:
        raise AttestationError("trust", "no CC signing key is pinned: pass --cc-trust sha256:<fingerprint> "
                                        "(printed by `shardlm serve`, shown by `shardlm info`)")
    if not trusts(pin, signed.signer):
        raise AttestationError("signing key", f"the report is signed by {key_fingerprint(signed.signer)}, "
                                              f"which is not the pinned key {pin_text(pin)}")
    if not Provider.verify(signed.signer, DOMAIN + signed.report, signed.signature):
        raise AttestationError("signature", "the report's Ed25519 signature does not verify under the pinned key")
    f = signed.fields()
    if bytes(f.get("nonce", b"")) != bytes(nonce):
        raise AttestationError("nonce", f"the report answers nonce {bytes(f.get('nonce', b'')).hex()[:16]}..., "
                                        f"not this session's fresh nonce {bytes(nonce).hex()[:16]}... "
                                        f"(a stale or replayed report)")
    if bytes(f.get("client_key", b"")) != bytes(client_key):
        raise AttestationError("key binding", "the report is bound to another client key exchange key")
    now = time.time() if now is None else now
    age = now - float(f.get("timestamp", 0.0))
    if abs(age) > window:
        raise AttestationError("freshness", f"the report's timestamp is {age:+.0f} s from now, outside the "
                                            f"freshness window of {window:g} s (a stale report, or clocks apart)")
    comps = f.get("components") or {}
    try:
        consistent = measurement_of(comps) == f.get("measurement")
    except (KeyError, TypeError):
        consistent = False
    if not consistent:
        raise AttestationError("measurement", "the report's measurement is not the hash of the parts it lists")
    want = measurement_of(expected)
    if f["measurement"] != want:
        diff = [f"{k}: server {comps.get(k)!r}, local {expected[k]!r}" for k in ("version", "code", "model")
                if comps.get(k) != expected[k]]
        raise AttestationError("measurement", f"measurement {f['measurement']} != local {want} ({'; '.join(diff)})")
    enclave_key = f.get("enclave_key")
    if not isinstance(enclave_key, bytes) or len(enclave_key) != 32:
        raise AttestationError("format", "the report's enclave key is not a 32-byte X25519 key")
    if not isinstance(f.get("session_id"), str):
        raise AttestationError("format", "the report names no session id")
    if session_id is not None and f["session_id"] != session_id:
        raise AttestationError("session", f"the report is bound to session {f['session_id']!r}, not this "
                                          f"session {session_id!r} (a report replayed from another session)")
    if f.get("simulated") is not True:
        raise AttestationError("provider evidence", f"the report claims hardware confidential computing "
                                                    f"(provider {f.get('provider')!r}, simulated=False) without "
                                                    f"vendor evidence this client can verify")
    return f


def check_info_report(cc: dict, *, nonce: bytes, pin: tuple[str, object] | None, model_fingerprint: str) -> dict:
    """``shardlm info --attest``: check the report the server signed over ``nonce`` (signature
    against the pin, or only against the key the server advertises when nothing is pinned;
    nonce; freshness; measurement against this machine's version and code and the server's
    advertised model). Raises :class:`AttestationError`; returns what was checked."""
    body = cc.get("report")
    if not isinstance(body, dict):
        raise AttestationError("format", "the server sent no attestation report")
    signed = SignedReport.from_body(body)
    pinned = pin is not None
    f = verify_report(signed, pin=pin or ("key", bytes(signed.signer)), nonce=nonce, client_key=bytes(32),
                      expected=local_components(model_fingerprint))
    return {"provider": f["provider"], "simulated": f["simulated"], "measurement": f["measurement"],
            "signer": key_fingerprint(signed.signer), "pinned": pinned,
            "checks": ["signing key" if pinned else "signing key (NOT pinned: only the advertised key)",
                       "signature", "nonce", "freshness", "measurement (version, code, model)"]}
