"""The serving hot path's design choices, each shown to hold.

- The dynamic batcher's worker is a thread: the next batch starts while the event loop is busy
  (a worker task on the loop could not run then), and requests from two event loops share batches.
- FastAPI's per-request OpenTelemetry check is cached for ``TELEMETRY_RECHECK_S``: a tracer provider
  configured while the server runs is used for the requests after that.
- The server process freezes its startup objects for the garbage collector and collects the young
  generation less often, and reference cycles are still collected.
"""

from __future__ import annotations

import asyncio
import threading
import time
from unittest import mock

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve.batching import DynamicBatcher  # noqa: E402


class _Timed:
    """Records each batch's size and start time; each call takes ``seconds``."""

    name = "timed"

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.sizes: list[int] = []
        self.starts: list[float] = []
        self.lock = threading.Lock()

    def run(self, x):
        with self.lock:
            self.starts.append(time.perf_counter())
            self.sizes.append(len(x))
        time.sleep(self.seconds)
        return {"features": x.reshape(len(x), -1).sum(axis=1, keepdims=True)}


def test_the_next_batch_runs_while_the_event_loop_is_blocked():
    enc = _Timed(0.05)
    x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)

    async def scenario():
        b = DynamicBatcher(enc, max_batch_size=4, max_queue_delay_s=0.0)
        task = asyncio.ensure_future(b.submit(x))  # 3 batches of 4
        await asyncio.sleep(0)  # submit has queued its jobs
        time.sleep(0.5)  # the loop is busy (a long parse): nothing on it can run
        ran_while_blocked = list(enc.sizes)
        out = await task
        await b.aclose()
        return ran_while_blocked, out

    ran_while_blocked, out = asyncio.run(scenario())
    assert ran_while_blocked == [4, 4, 4]
    np.testing.assert_array_equal(out["features"][:, 0], x.ravel())
    gaps = np.diff(enc.starts)  # back to back: each batch starts as the last one ends
    assert (gaps < 0.05 + 0.04).all(), gaps


def test_requests_from_two_event_loops_share_one_batch_and_get_their_own_rows():
    enc = _Timed(0.0)
    b = DynamicBatcher(enc, max_batch_size=8, max_queue_delay_s=1.0)
    x = np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(2)

    def client(k: int) -> None:
        async def go():
            start.wait(5)
            return await b.submit(x[4 * k:4 * k + 4])

        results[k] = asyncio.run(go())["features"][:, 0]

    threads = [threading.Thread(target=client, args=(k,)) for k in (0, 1)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert enc.sizes == [8]  # one full batch (no 1 s delay): both loops' jobs merged
    assert time.perf_counter() - t0 < 0.9
    np.testing.assert_array_equal(results[0], x.ravel()[:4])
    np.testing.assert_array_equal(results[1], x.ravel()[4:])
    asyncio.run(b.aclose())


def test_a_tracer_provider_configured_while_serving_is_used_after_the_recheck(monkeypatch):
    from fastapi.testclient import TestClient

    from serve.server import _ZooApp

    app = _ZooApp()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    with TestClient(app) as client:
        assert client.get("/ping").status_code == 200
        assert app._telemetry_on is False  # no provider: FastAPI's telemetry is skipped
        provider = mock.MagicMock()
        app._telemetry["tracer_provider"] = provider
        clock = [time.monotonic()]
        monkeypatch.setattr("serve.guard.time.monotonic", lambda: clock[0])
        client.get("/ping")
        assert not provider.get_tracer.called  # within the recheck interval: the cached answer
        clock[0] += app.TELEMETRY_RECHECK_S + 0.01
        client.get("/ping")
        assert app._telemetry_on is True and provider.get_tracer.called  # FastAPI traced this request


def test_gc_tuning_freezes_startup_objects_and_still_collects_cycles():
    import subprocess
    import sys
    import textwrap

    # in a child process: freezing is for a server process, not for the test runner
    code = textwrap.dedent("""
        import gc, weakref
        from serve.server import GC_YOUNG_THRESHOLD, tune_gc_for_serving
        before = gc.get_freeze_count()
        tune_gc_for_serving()
        assert gc.get_freeze_count() > before, "startup objects were not frozen"
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        class Node: pass
        freed = []
        a, b = Node(), Node(); a.other, b.other = b, a  # a reference cycle: refcounting cannot free it
        weakref.finalize(a, freed.append, True)
        del a, b
        junk = [[i] for i in range(3 * GC_YOUNG_THRESHOLD)]  # allocations alone trigger a collection
        assert freed == [True], "the cycle was never collected"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
