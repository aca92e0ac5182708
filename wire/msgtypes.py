"""Every message type on the wire, in one table.

Codes are stable (they appear in recorded transcripts and golden tests); add new ones at
the end of a block, never renumber. 0x00xx: control, 0x01xx: session, 0x1xxx: protocols.
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


def is_known(code: int) -> bool:
    try:
        MsgType(code)
    except ValueError:
        return False
    return True
