"""v3-cc: inference inside an attested confidential-computing boundary, over an AEAD channel.

Parts (each module says what it guarantees and what it does not):

- ``provider``: where the trust comes from (the seeds' ``ConfidentialCompute``): ``software``
  (an Ed25519 key held by the server process: a *simulated* TEE) and ``nvidia`` (GPU CC mode;
  refused with a clear error where it is not present: never a silent fallback).
- ``attestation``: the signed report (provider, measurement, enclave X25519 key, client nonce,
  timestamp) and the client's checks on it.
- ``aead``: session keys from X25519 (libsodium ``crypto_kx``), every message sealed with
  XChaCha20-Poly1305, counter nonces, session id and direction as associated data.
- ``enclave``: the boundary. Its interface takes and returns ciphertext only; inside, the
  plaintext forward with its own KV cache.
- ``service``: the server handler (which only ever moves ciphertext) and the client.

Threat model, plainly: with a hardware provider the server operator is outside the trust
boundary. With the ``software`` provider the "enclave" is ordinary memory of the server
process, so the operator can read everything: it protects against network observers and
unattested servers, not against the server's operator.
"""

SIMULATED_NOTE = ("simulated TEE: protects against network observers and unattested servers, "
                  "not against the server's operator")
