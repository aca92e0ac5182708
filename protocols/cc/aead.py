"""The channel between the client and the enclave: X25519 session keys, XChaCha20-Poly1305.

Keys: libsodium's ``crypto_kx`` (X25519, then BLAKE2b over the shared point and both public
keys) gives each side a receive key and a transmit key; the client's transmit key is the
enclave's receive key. Both key pairs are ephemeral (one per session), so a later key
compromise does not open recorded sessions.

Every message is ``(counter, ciphertext)``. The nonce is the direction byte and the 64-bit
counter; the associated data binds the protocol label, the session id, the direction and the
counter. The receiver accepts only the next counter: an earlier one is a replay, a later one
a reordering or a drop, and both end the session, as does any authentication failure.
"""

from __future__ import annotations

import nacl.bindings as sodium
import nacl.exceptions
import nacl.public

from ...wire.errors import ErrorCode, ProtocolError

LABEL = b"shardlm-cc/v1\0"
TO_ENCLAVE, TO_CLIENT = b"\x01", b"\x02"
TAG_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES


class AuthError(ProtocolError):
    def __init__(self, message: str):
        super().__init__(ErrorCode.AUTH_FAILED, message)


class ReplayError(ProtocolError):
    def __init__(self, message: str):
        super().__init__(ErrorCode.REPLAY, message)


def keypair() -> tuple[bytes, bytes]:
    """A fresh ephemeral X25519 key pair (public, secret)."""
    sk = nacl.public.PrivateKey.generate()
    return bytes(sk.public_key), bytes(sk)


class SealedChannel:
    """One side's state: keys, session id and both counters."""

    def __init__(self, rx: bytes, tx: bytes, session_id: str, *, enclave: bool):
        self._rx, self._tx = rx, tx
        self._sid = session_id.encode()
        self._send_dir, self._recv_dir = (TO_CLIENT, TO_ENCLAVE) if enclave else (TO_ENCLAVE, TO_CLIENT)
        self.sent = 0      # counter of the next message sealed
        self.expected = 0  # counter of the next message accepted

    @classmethod
    def client(cls, client_pk: bytes, client_sk: bytes, enclave_pk: bytes, session_id: str) -> "SealedChannel":
        return cls._exchange(False, client_pk, client_sk, enclave_pk, session_id)

    @classmethod
    def enclave(cls, enclave_pk: bytes, enclave_sk: bytes, client_pk: bytes, session_id: str) -> "SealedChannel":
        return cls._exchange(True, enclave_pk, enclave_sk, client_pk, session_id)

    @classmethod
    def _exchange(cls, enclave: bool, pk: bytes, sk: bytes, peer_pk: bytes, session_id: str) -> "SealedChannel":
        kx = sodium.crypto_kx_server_session_keys if enclave else sodium.crypto_kx_client_session_keys
        try:
            rx, tx = kx(pk, sk, peer_pk)
        except (nacl.exceptions.CryptoError, TypeError, ValueError) as exc:
            raise AuthError(f"key exchange with the {'client' if enclave else 'enclave'} key failed: {exc}") from None
        return cls(rx, tx, session_id, enclave=enclave)

    def _nonce_ad(self, direction: bytes, counter: int) -> tuple[bytes, bytes]:
        c = counter.to_bytes(8, "little")
        return direction + bytes(15) + c, LABEL + self._sid + b"\0" + direction + c

    def seal(self, plaintext: bytes) -> tuple[int, bytes]:
        counter = self.sent
        nonce, ad = self._nonce_ad(self._send_dir, counter)
        ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plaintext), ad, nonce, self._tx)
        self.sent += 1
        return counter, ct

    def open(self, counter: int, ciphertext: bytes) -> bytes:
        if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
            raise AuthError("malformed sealed message: the counter must be a non-negative integer")
        if counter < self.expected:
            raise ReplayError(f"replayed message: counter {counter} was already accepted "
                              f"(next expected {self.expected})")
        if counter > self.expected:
            raise ReplayError(f"out-of-order message: counter {counter}, expected {self.expected} "
                              f"(reordered or dropped)")
        nonce, ad = self._nonce_ad(self._recv_dir, counter)
        try:
            pt = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(ciphertext), ad, nonce, self._rx)
        except nacl.exceptions.CryptoError:
            raise AuthError(f"message {counter} failed authentication (XChaCha20-Poly1305): tampered, or not "
                            f"sealed for this session and direction") from None
        self.expected += 1
        return pt
