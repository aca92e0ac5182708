"""TLS 1.3 contexts, self-signed certificates, fingerprint pinning, optional mutual TLS.

Trust model: the server's certificate is self-signed by default and the client pins the
SHA-256 fingerprint of its DER encoding (``sha256:<hex>``), or trusts a CA file. A client with
neither refuses to connect: there is no unauthenticated mode. Mutual TLS is optional: given a
CA, the server requires client certificates signed by it (``shardlm certs --client``).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class TLSConfigError(Exception):
    """Bad TLS configuration (missing files, malformed fingerprint, no trust anchor)."""


class PinMismatch(ssl.SSLError):
    """The server's certificate does not have the pinned fingerprint."""

    def __str__(self) -> str:  # SSLError's own str of a one-argument error is the args tuple
        return str(self.args[0]) if self.args else "certificate pin mismatch"


def fingerprint_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_of(cert_path: str | Path) -> str:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def normalize_fingerprint(fp: str) -> str:
    """Accept ``sha256:<hex>``, bare hex, or colon-separated hex; return ``sha256:<hex>``."""
    text = fp.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:"):]
    text = text.replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise TLSConfigError(f"not a SHA-256 fingerprint: {fp!r} (expected sha256:<64 hex digits>)")
    return "sha256:" + text


def _write_key(key, path: Path) -> None:
    """A private key file, mode 0600 from its creation (never briefly readable by others): a new
    file made with O_EXCL, then renamed over any old one."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, sans=(), client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _sans(hosts) -> list:
    out = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def generate_server_cert(out_dir: str | Path, hosts=("localhost", "127.0.0.1", "::1")) -> str:
    """Write ``server.crt`` and ``server.key`` (self-signed, ECDSA P-256); return the fingerprint.

    The certificate is its own CA (basicConstraints CA=true) so clients may also trust it as
    a CA file instead of pinning it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("shardlm server", key, None, None, ca=True, sans=_sans(hosts))
    _write_key(key, out / "server.key")
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def generate_client_ca(out_dir: str | Path, client_name: str = "shardlm client") -> None:
    """Write ``client-ca.crt``/``.key`` and a ``client.crt``/``.key`` it signed (for mutual TLS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shardlm client CA")])
    ca_cert = _cert("shardlm client CA", ca_key, None, None, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(client_name, key, ca_name, ca_key, ca=False, client=True)
    _write_key(ca_key, out / "client-ca.key")
    (out / "client-ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, out / "client.key")
    (out / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _require(path, what: str) -> str:
    if path is None or not Path(path).is_file():
        raise TLSConfigError(f"{what} not found: {path}")
    return str(path)


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(_require(cert, "server certificate"), _require(key, "server key"))
    if client_ca is not None:
        ctx.load_verify_locations(_require(client_ca, "client CA file"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    *, fingerprint: str | None = None, ca: str | Path | None = None,
    cert: str | Path | None = None, key: str | Path | None = None,
) -> ssl.SSLContext:
    """A client context; with a fingerprint, call :func:`check_pin` after the handshake."""
    if fingerprint is None and ca is None:
        raise TLSConfigError(
            "no way to authenticate the server: pass --tls-fingerprint sha256:<hex> "
            "(printed by `shardlm certs` and `shardlm serve`) or --ca FILE"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca is not None:
        ctx.load_verify_locations(_require(ca, "CA file"))
    else:
        # Verification is the pin itself, checked right after the handshake, before any data.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None or key is not None:
        ctx.load_cert_chain(_require(cert, "client certificate"), _require(key, "client key"))
    return ctx


def peer_fingerprint(stream) -> str | None:
    """The fingerprint of the certificate the peer of a TLS stream presented (None: not TLS, or none)."""
    getpeercert = getattr(stream, "getpeercert", None)
    der = getpeercert(binary_form=True) if getpeercert is not None else None
    return fingerprint_der(der) if der else None


def check_pin(peer_der: bytes | None, fingerprint: str) -> None:
    expected = normalize_fingerprint(fingerprint)
    if peer_der is None:
        raise PinMismatch("server presented no certificate")
    got = fingerprint_der(peer_der)
    if not hmac.compare_digest(got, expected):
        raise PinMismatch(f"server certificate fingerprint {got} does not match the pinned {expected}")
