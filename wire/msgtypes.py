"""Every message type on the wire, in one table.

Codes are stable (they appear in recorded transcripts and golden tests); add new ones at
the end of a block, never renumber. 0x00xx: control, 0x01xx: session, 0x1xxx: protocols
(0x10xx plain/v2/v3, 0x11xx OT, 0x12xx MPC, 0x13xx CC, 0x14xx split, 0x15xx dealer,
0x16xx HE).
"""

from __future__ import annotations

import enum


class MsgType(enum.IntEnum):
    # control, valid before and after the handshake
    ERROR = 0x0001
    HEALTH = 0x0010
    HEALTH_OK = 0x0011
    INFO = 0x0012
    INFO_OK = 0x0013
    # session set-up and keep-alive
    HELLO = 0x0100
    HELLO_OK = 0x0101
    PING = 0x0110
    PONG = 0x0111
    BYE = 0x0120
    # plain (0x10xx): the insecure baseline
    PLAIN_FORWARD = 0x1000
    PLAIN_LOGITS = 0x1001
    # v2 / v3 (0x101x): masked linear offload
    MASKED_LINEAR = 0x1010
    MASKED_LINEAR_OK = 0x1011
    # OT engine (protocols/ot)
    OT_BASE_A = 0x1100      # Chou-Orlandi sender's A = aG
    OT_BASE_B = 0x1101      # Chou-Orlandi receiver's B_i, one per base OT
    OT_EXT_U = 0x1110       # IKNP receiver -> sender: one chunk of the 128 x m matrix u
    OT_EXT_CORR = 0x1111    # IKNP sender -> receiver: corrections (correlated / chosen-message OT)
    OT_NOFN_CT = 0x1120     # 1-of-N sender -> receiver: masked messages
    OT_EMB_REQ = 0x1130     # embedding retrieval: client asks for rows (a count, never ids)
    OT_EMB_TABLE = 0x1131   # embedding retrieval: server's table encrypted under fresh row keys
    OT_REQ = 0x1180         # `ot` session: client asks for a batch of OTs (kind, count, server role)
    OT_DONE = 0x1181        # `ot` session: server's end-of-batch report
    # v3-mpc (0x12xx, protocols/mpc/service.py): every tensor body is int64 ring elements
    MPC_SETUP = 0x1200      # client -> server: triple source ('dealer' + the server's 32-byte share seed as int64[4], or 'ot') and range profile
    MPC_SETUP_OK = 0x1201   # server -> client: accepted (empty)
    MPC_INPUT = 0x1210      # client -> server: the embedded tokens re-shared, enc(x) - r (T, d); starts a forward of T tokens
    MPC_RESHARE = 0x1211    # client -> server: a linear layer's input share minus the client's preprocessed mask, x_c - r
    MPC_OPEN = 0x1220       # client -> server: the client's shares of every value opened in one round (flat)
    MPC_OPEN_OK = 0x1221    # server -> client: the server's shares of the same values (flat)
    MPC_REVEAL = 0x1230     # server -> client: the server's share of the last position's logits (ends a forward)
    # v3-cc (protocols/cc): attestation, then sealed requests into the enclave boundary
    CC_ATTEST = 0x1300      # client -> server: fresh nonce + client X25519 public key
    CC_REPORT = 0x1301      # server -> client: signed attestation report (enclave X25519 key)
    CC_SEALED = 0x1310      # client -> enclave: counter + XChaCha20-Poly1305 ciphertext
    CC_SEALED_OK = 0x1311   # enclave -> client: counter + ciphertext
    # split (0x14xx): layer-split inference, NOT private (the server sees hidden states)
    SPLIT_OPEN = 0x1400     # client -> server: the layer range the server runs
    SPLIT_OPEN_OK = 0x1401  # server -> client: accepted range, session TTL
    SPLIT_FORWARD = 0x1410  # client -> server: hidden rows at position `start` (crops the server's KV cache to `start`)
    SPLIT_HIDDEN = 0x1411   # server -> client: hidden rows after the server's layers, its KV cache length
    # dealer (0x15xx, protocols/dealer.py): a third party deals mask material; never offered by `serve`
    DEAL_REQ = 0x1500       # client -> dealer: a fresh take id, model, variant and mask rows per unit
    DEAL_PART = 0x1501      # dealer -> client: one unit's mask seed and W r for a slice of its rows
    DEAL_OK = 0x1502        # dealer -> client: the take is complete (rows per unit, the dealer's compute time)
    # --offline he (0x16xx): the server multiplies the client's encrypted masks (protocols/he)
    HE_SETUP = 0x1600       # client -> server: the BFV parameter set (no key of any kind)
    HE_SETUP_OK = 0x1601    # server -> client: accepted (empty)
    HE_PRODUCT = 0x1610     # client -> server: a unit block's row count and its mask limbs' ciphertexts
    HE_PRODUCT_OK = 0x1611  # server -> client: the product ciphertexts and the server's CPU time


def is_known(code: int) -> bool:
    try:
        MsgType(code)
    except ValueError:
        return False
    return True
