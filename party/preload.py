"""The server's ready state: build the offered protocols' server-side state at start-up.

A protocol's implementation may provide ``preload(spec, server, progress) -> dict`` (party/spec):
it builds what its sessions would otherwise build on first use (the masked protocols' ring
matrices and packed kernels: seconds to minutes), calling ``progress(done, total)`` as it goes,
and returns a summary (e.g. matrices loaded from the disk cache vs built). The server runs the
chosen protocols' hooks one after the other in one worker thread while it already accepts
connections (health and info answer at once; two builds at a time would only compete for the
cores with the sessions being served), and reports ``loading`` with progress until all are done,
then ``ready``.

A session of a protocol that is still loading waits for it (:meth:`Preloader.wait`) instead of
building the same state a second time in parallel; its client sees a slow first request, not an
error. A protocol not preloaded builds on its first session, as before.
"""

from __future__ import annotations

import logging
import os
import time

import trio

from .spec import ProtocolSpec

log = logging.getLogger("shardlm.server")

# Test and orchestration hook: hold every protocol's preload until this file exists (a test can
# then look at a server that is loading for as long as it needs, without timing races).
HOLD_ENV = "SHARDLM_PRELOAD_HOLD"


class Preloader:
    def __init__(self, server, names: list[str]):
        self.server = server
        self.names = list(names)
        self.state = {n: {"status": "queued", "done": 0, "total": None} for n in self.names}
        self._events = {n: trio.Event() for n in self.names}
        self.started = time.monotonic()
        self.seconds: float | None = None  # start-up to ready

    @property
    def ready(self) -> bool:
        return all(e.is_set() for e in self._events.values())

    async def wait(self, protocol: str) -> None:
        """Return once ``protocol``'s preload is over (at once if it is not preloaded)."""
        if protocol in self._events:
            await self._events[protocol].wait()

    def progress(self) -> dict:
        """Units built over all preloaded protocols (a protocol not yet started counts 0 of ?)."""
        done = sum(s["done"] for s in self.state.values())
        totals = [s["total"] for s in self.state.values()]
        return {"done": done, "total": sum(totals) if None not in totals else None,
                "protocols_ready": sum(e.is_set() for e in self._events.values()), "protocols": len(self.names)}

    async def run(self, on_ready=None) -> None:
        for name in self.names:
            await self._one(name, self.server.offered[name])
        self.seconds = round(time.monotonic() - self.started, 3)
        if on_ready is not None:
            on_ready(self)

    async def _one(self, name: str, spec: ProtocolSpec) -> None:
        st = self.state[name]
        try:
            hook = spec.hook("preload")
            if hook is None:  # nothing built on first use (echo, plain, split, v3-cc)
                st.update(status="ready", done=0, total=0)
                return
            st["status"] = "loading"
            t0 = time.monotonic()

            def progress(done: int, total: int) -> None:  # from the worker thread: plain stores
                st["done"], st["total"] = done, total

            def build():
                hold = os.environ.get(HOLD_ENV)
                while hold and not os.path.exists(hold):
                    time.sleep(0.05)
                return hook(spec, self.server, progress)
            summary = await trio.to_thread.run_sync(build)
            st.update(status="ready", seconds=round(time.monotonic() - t0, 3), **(summary or {}))
            log.info("preloaded %s in %.1f s: %s", name, st["seconds"], summary)
        except Exception as exc:  # the server still serves; this protocol then builds on first use
            log.exception("preloading %s failed", name)
            st.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._events[name].set()


def choose(value: str | None, offered: dict[str, ProtocolSpec], default: tuple[str, ...]) -> list[str]:
    """``--preload``'s protocols: ``all``, ``none`` or a comma list of offered names (ValueError
    naming an unknown one); None: those of ``default`` the server offers."""
    if value is None:
        return [n for n in default if n in offered]
    value = value.strip()
    if value == "none":
        return []
    if value == "all":
        return [n for n, s in offered.items() if s.hook("preload") is not None]
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in offered]
    if unknown or not names:
        raise ValueError(f"--preload: {', '.join(unknown) or repr(value)} is not an offered protocol "
                         f"(all, none, or a comma list of: {', '.join(sorted(offered))})")
    return list(dict.fromkeys(names))
