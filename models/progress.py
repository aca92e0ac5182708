"""Progress of long local work on stderr, readable both on a terminal and in a log file.

On a terminal one line is redrawn in place (``\\r``) as often as it changes; anywhere else (a
file, a pipe, CI) each update is a plain line, at most one every ``interval`` seconds plus the
last, so a log holds a few readable lines instead of hundreds of carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, interval: float = 2.0):
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._last = -float("inf")
        self._width = 0

    def __call__(self, text: str, last: bool = False) -> None:
        """Show ``text``; ``last`` ends the line (the work is done)."""
        now = time.monotonic()
        if self.live:
            self.stream.write("\r" + text.ljust(self._width) + ("\n" if last else ""))
            self._width = 0 if last else max(self._width, len(text))
        elif last or now - self._last >= self.interval:
            self.stream.write(text + "\n")
        else:
            return
        self._last = now
        self.stream.flush()

    def clear(self) -> None:
        """Erase an unfinished live line (before other output, e.g. streamed tokens, starts)."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
