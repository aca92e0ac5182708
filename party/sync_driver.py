"""Run synchronous protocol code (the v3-mpc engine) on a trio task, awaiting its I/O in between.

The engine is plain synchronous code that meets the other party thousands of times per token.
Running it in a worker thread costs a thread hand-off each way per meeting (trio.from_thread:
~0.2 ms of a ~0.65 ms loopback round, measured). Here it runs in a greenlet on the trio task's
own thread instead: :func:`call` switches back to :func:`drive`, which awaits the async
function and switches the result (or the exception, e.g. trio.Cancelled) back in.

The price: the engine's compute between two meetings holds the event loop (~0.5 ms per round
for SmolLM2 decode). Long pure-compute pieces (the server's weight products) go to a worker
thread with ``call(trio.to_thread.run_sync, fn)``, so other sessions keep moving.
"""

from __future__ import annotations

import greenlet


async def drive(fn, *args):
    """``fn(*args)`` in a greenlet; every :func:`call` inside it is awaited here. Returns its result."""
    g = greenlet.greenlet(fn)
    req = g.switch(*args)
    while not g.dead:
        afn, a = req
        try:
            res = await afn(*a)
        except BaseException as exc:  # noqa: BLE001 - thrown into the engine, which may clean up
            req = g.throw(exc)
        else:
            req = g.switch(res)
    return req


def call(afn, *args):
    """From synchronous code running under :func:`drive`: ``await afn(*args)`` and return its result."""
    parent = greenlet.getcurrent().parent
    if parent is None:
        raise RuntimeError("sync_driver.call outside sync_driver.drive")
    return parent.switch((afn, args))
