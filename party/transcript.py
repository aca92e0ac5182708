"""Recording what one party receives, for audits (``serve --record-transcript DIR``).

Format of a recorded session, one directory per connection ``DIR/<session_id>/``:

- ``frames.bin``: every frame exactly as received (20-byte header + payload), concatenated.
- ``index.jsonl``: one JSON object per frame, in order: ``n`` (0-based), ``t`` (seconds since
  the connection opened), ``phase`` (the channel's phase when it arrived), ``type`` (MsgType
  name), ``type_code``, ``seq``, ``offset`` (of the header in frames.bin), ``frame_bytes``.
- ``meta.json``: ``session_id``, ``role`` (whose view this is), ``peer``, ``started`` (unix
  time), and after the handshake ``protocol`` and ``model_fingerprint``.

:func:`load_transcript` re-checks every frame (magic, CRC) and decodes the bodies, so an
auditor works from the bytes, not from what the server chose to log about them.

Each frame is flushed to the files as it is recorded, so a server killed mid-session (kill -9)
leaves a transcript that holds every frame it received but the one in flight: the last frame
may be cut, or missing from the index. ``load_transcript(..., partial=True)`` reads such a
transcript up to its last complete, indexed frame.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..wire import codec, frames
from ..wire.msgtypes import MsgType


@dataclasses.dataclass
class RecordedMessage:
    n: int
    t: float
    phase: str
    type: MsgType
    seq: int
    body: dict
    frame_bytes: int


class TranscriptRecorder:
    def __init__(self, directory: str | Path, session_id: str, role: str, peer: str = ""):
        self.dir = Path(directory) / session_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._frames = open(self.dir / "frames.bin", "wb")
        self._index = open(self.dir / "index.jsonl", "w")
        self._t0 = time.monotonic()
        self._n = 0
        self._offset = 0
        self.meta = {"session_id": session_id, "role": role, "peer": peer, "started": time.time()}
        self._write_meta()

    def _write_meta(self) -> None:
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=1))

    def update_meta(self, **fields) -> None:
        self.meta.update(fields)
        self._write_meta()

    def record(self, frame: frames.Frame, phase: str) -> None:
        header = frames.HEADER.pack(
            frames.MAGIC, frames.WIRE_VERSION, frame.type, frame.flags, frame.seq,
            len(frame.payload), frames.crc_of([frame.payload]),
        )
        self._frames.write(header)
        self._frames.write(frame.payload)
        size = len(header) + len(frame.payload)
        try:
            name = MsgType(frame.type).name
        except ValueError:
            name = f"0x{frame.type:04x}"
        entry = {
            "n": self._n, "t": round(time.monotonic() - self._t0, 6), "phase": phase, "type": name,
            "type_code": frame.type, "seq": frame.seq, "offset": self._offset, "frame_bytes": size,
        }
        self._frames.flush()  # on disk (the kernel's) before it is indexed: a kill loses at most this frame
        self._index.write(json.dumps(entry) + "\n")
        self._index.flush()
        self._n += 1
        self._offset += size

    def close(self) -> None:
        self._frames.close()
        self._index.close()


def load_transcript(session_dir: str | Path, *, partial: bool = False) -> tuple[dict, list[RecordedMessage]]:
    """Return (meta, messages) of one recorded session directory.

    ``partial``: the transcript of a recorder that was killed: return the frames up to the last
    complete, indexed one (a cut last frame, a cut index line and a meta.json cut mid-write, read
    as ``{}``, are accepted; a frame that fails its CRC is still an error)."""
    d = Path(session_dir)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except ValueError:
        if not partial:
            raise
        meta = {}
    decoder = frames.FrameDecoder(frames.Limits(max_frame_bytes=2**32 - 1, max_tensor_elements=2**40))
    decoder.feed((d / "frames.bin").read_bytes())
    out = []
    with open(d / "index.jsonl") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                if partial and not line.endswith("\n"):
                    return meta, out
                raise
            frame = decoder.next_frame()
            if frame is None and partial:
                return meta, out
            if frame is None or frame.seq != entry["seq"] or frame.type != entry["type_code"]:
                raise ValueError(f"{d}: frames.bin and index.jsonl disagree at frame {entry['n']}")
            out.append(RecordedMessage(
                n=entry["n"], t=entry["t"], phase=entry["phase"], type=MsgType(frame.type), seq=frame.seq,
                body=codec.decode_body(frame.payload, decoder.limits), frame_bytes=entry["frame_bytes"],
            ))
    if decoder.buffered and not partial:
        raise ValueError(f"{d}: {decoder.buffered} bytes in frames.bin beyond the index")
    return meta, out


def session_dirs(directory: str | Path) -> list[Path]:
    """Recorded sessions under ``directory``, oldest first."""
    dirs = [p for p in Path(directory).iterdir() if (p / "meta.json").is_file()]
    return sorted(dirs, key=lambda p: json.loads((p / "meta.json").read_text())["started"])
