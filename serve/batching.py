"""Per-model serving core shared by every front end (HTTP, gRPC): metrics, the dynamic batcher, served models."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from serve.kserve import (
    MODEL_VERSION,
)
from serve.preprocess import (
    Preprocessor,
)

# ----------------------------------------------------------------------------------------------- metrics


class _InFlight:
    """Requests being handled, as a plain int: every front end counts on the one event loop."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zoo_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.failures = Counter("zoo_http_failures", "requests answered with an error (kind: client 4xx, "
                                "server 5xx, timeout 504)", ["endpoint", "kind"], registry=r)
        self.latency = Histogram("zoo_http_request_duration_seconds", "request latency", ["endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.in_flight = _InFlight()  # inc/dec per request without a lock; the gauge reads it when scraped
        Gauge("zoo_http_requests_in_flight", "HTTP requests being handled",
              registry=r).set_function(lambda: self.in_flight.value)
        self.batch_size = Histogram("zoo_batch_size", "images per encoder call (dynamic batching); "
                                    "_sum/_count = average batch size", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_requests = Histogram("zoo_batch_requests", "requests merged into one encoder call", ["model"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_wait = Histogram("zoo_queue_wait_seconds", "time a request waited in the batching queue",
                                    ["model"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                        0.5, 1, 2.5, 5), registry=r)
        self.compute = Histogram("zoo_compute_seconds", "encoder.run time per merged batch", ["model"],
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                 registry=r)
        self.images = Counter("zoo_images", "images encoded", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ------------------------------------------------------------------------------------- dynamic batching


class _Job:
    """One piece of a request (at most ``max_batch_size`` images), the future its outputs go to, its loop."""

    __slots__ = ("images", "future", "loop", "enqueued")

    def __init__(self, images: np.ndarray, future: asyncio.Future, loop: asyncio.AbstractEventLoop):
        self.images = images
        self.future = future
        self.loop = loop
        self.enqueued = time.perf_counter()


def _settle(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """On a job's event loop: hand each still-waiting future its outputs or its exception."""
    for fut, value, exc in items:
        if not fut.done():  # timed out or cancelled meanwhile
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)


class DynamicBatcher:
    """Merges concurrent requests for one encoder into batched ``encoder.run`` calls.

    ``await submit(images)`` queues ``[n,3,H,W]`` float32 images (split into pieces of at most
    ``max_batch_size``) and returns the encoder outputs for exactly those images. A worker thread takes
    the oldest job, waits until ``max_queue_delay_s`` after that job arrived for more (or until the batch
    is full), concatenates, runs the encoder once and splits the outputs back, each request's on its own
    event loop (HTTP and gRPC may run on different loops). ``calls`` / ``batch_sizes`` record what ran
    (tests and benchmarks read them).

    Why a thread and not a task on the event loop: a task could start the next batch only when the loop
    got round to it, behind every request parse queued meanwhile, and for a small model the encoder then
    sat idle for most of a batch's time (profiled: served throughput bound by that wait). The thread
    starts the next batch the moment the last one is done. Per-request cost stays low: ``submit`` takes
    one lock, wakes the thread only when it is idle or the batch just became full, and awaits its job's
    future directly (its timeout is a timer on that future, not a ``wait_for`` task); results come back
    in one ``call_soon_threadsafe`` per batch and loop.
    """

    def __init__(self, encoder: Any, *, max_batch_size: int = 32, max_queue_delay_s: float = 0.002,
                 metrics: ServerMetrics | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {max_queue_delay_s}")
        self.encoder = encoder
        self.name = str(encoder.name)
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = float(max_queue_delay_s)
        self.metrics = metrics
        self.calls = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0  # images in _jobs (abandoned jobs included until popped: at worst an early run)
        self._idle = True  # the worker waits for a first job (vs. sleeping out the queue delay)
        self._thread: threading.Thread | None = None
        self._closed = False
        if metrics is not None:  # labelled children resolved once, not per batch
            self._m = (metrics.batch_size.labels(self.name), metrics.batch_requests.labels(self.name),
                       metrics.compute.labels(self.name), metrics.images.labels(self.name),
                       metrics.queue_wait.labels(self.name))

    @staticmethod
    def _expire(fut: asyncio.Future, timeout: float) -> None:
        if not fut.done():  # the worker skips done jobs
            fut.set_exception(TimeoutError(f"not computed within {timeout:g} s"))

    async def submit(self, images: np.ndarray, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Encoder outputs for ``images`` ``[n,3,H,W]``, computed in merged batches.

        ``timeout`` (seconds): raise ``TimeoutError`` when the outputs are not there by then (the queued
        work is dropped).
        """
        loop = asyncio.get_running_loop()
        step = self.max_batch_size
        if len(images) <= step:  # every single-image request: no slicing, no list comprehension
            jobs = [_Job(images, loop.create_future(), loop)]
        else:
            jobs = [_Job(images[i:i + step], loop.create_future(), loop) for i in range(0, len(images), step)]
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"zoo-batcher-{self.name}", daemon=True)
                self._thread.start()
            self._jobs.extend(jobs)
            self._queued += len(images)
            if self._idle or self._queued >= self.max_batch_size:
                self._cond.notify()
        timers = [loop.call_later(timeout, self._expire, j.future, timeout) for j in jobs] if timeout else []
        try:
            if len(jobs) == 1:
                return await jobs[0].future
            parts = await asyncio.gather(*(j.future for j in jobs))
        except BaseException:
            for j in jobs:  # timed out / disconnected: the worker skips these
                j.future.cancel()
            raise
        finally:
            for t in timers:
                t.cancel()
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _next_batch(self) -> tuple[list[_Job], int] | None:
        """Under the lock: wait for work, sleep out the oldest job's queue delay, take up to a full batch.

        None once closed. A job's ``future.done()`` is read off its loop: a stale False only means a
        dropped request is computed anyway (its result is then discarded by ``_settle``).
        """
        while True:
            while not self._jobs and not self._closed:
                self._idle = True
                self._cond.wait()
            if self._closed:
                return None
            self._idle = False
            first = self._jobs[0]
            if first.future.done():
                self._queued -= len(self._jobs.popleft().images)
                continue
            # Wait until the oldest job is max_queue_delay old, unless the batch fills up first
            # (submit notifies when it does).
            deadline = first.enqueued + self.max_queue_delay_s
            while self._queued < self.max_batch_size and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Job] = []
            n = 0
            while self._jobs:
                job = self._jobs[0]
                if job.future.done():
                    self._queued -= len(self._jobs.popleft().images)
                    continue
                if batch and n + len(job.images) > self.max_batch_size:
                    break
                batch.append(self._jobs.popleft())
                self._queued -= len(job.images)
                n += len(job.images)
            if batch:
                return batch, n

    def _worker(self) -> None:
        while True:
            with self._cond:
                taken = self._next_batch()
            if taken is None:
                return
            self._run(*taken)

    def _run(self, batch: list[_Job], n: int) -> None:
        start = time.perf_counter()
        x = batch[0].images if len(batch) == 1 else np.concatenate([j.images for j in batch])
        out, error = None, None
        try:
            out = self.encoder.run(x)
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            error = e
        self.calls += 1
        self.batch_sizes.append(n)
        compute = time.perf_counter() - start
        if self.metrics is not None and error is None:
            size, requests, compute_s, images, queue_wait = self._m
            size.observe(n)
            requests.observe(len(batch))
            compute_s.observe(compute)
            images.inc(n)
            for j in batch:
                queue_wait.observe(max(0.0, start - j.enqueued))
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        offset = 0
        for j in batch:
            k = len(j.images)
            value = None if out is None else {name: v[offset:offset + k] for name, v in out.items()}
            per_loop.setdefault(j.loop, []).append((j.future, value, error))
            offset += k
        for loop, items in per_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, items)

    async def aclose(self) -> None:
        """Stop the worker; queued requests fail with 'shutting down' (a batch being computed finishes)."""
        with self._cond:
            self._closed = True
            jobs = list(self._jobs)
            self._jobs.clear()
            self._queued = 0
            self._cond.notify_all()
        stop = RuntimeError("the server is shutting down")
        for j in jobs:
            with contextlib.suppress(RuntimeError):
                j.loop.call_soon_threadsafe(_settle, [(j.future, None, stop)])
        await asyncio.sleep(0)  # let this loop settle its own jobs before returning


# ------------------------------------------------------------------------------------ served models


class ServedModel:
    """One encoder with its batcher, preprocessing and KServe v2 metadata."""

    def __init__(self, encoder: Any, batcher: DynamicBatcher, max_batch_size: int, max_queue_delay_s: float):
        self.encoder = encoder
        self.name = str(encoder.name)
        self.batcher = batcher
        self.input_name = str(getattr(encoder, "input_name", "images"))
        self.input_shape = tuple(int(s) for s in encoder.input_shape)
        self.output_names = [str(n) for n in encoder.output_names]
        self.embed_dim = int(encoder.embed_dim)
        self.num_clusters = int(encoder.num_clusters) if getattr(encoder, "num_clusters", None) else None
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._preprocessor: Preprocessor | None = None
        self._lock = threading.Lock()

    @property
    def preprocessor(self) -> Preprocessor:
        """The model's image preprocessing, built on first use (it imports torch, which the v2 API needs not)."""
        with self._lock:
            if self._preprocessor is None:
                pre = Preprocessor(self.encoder.pretrained_cfg)
                if tuple(pre.input_shape) != self.input_shape:
                    raise ValueError(f"model {self.name!r}: preprocessing gives {pre.input_shape} but the "
                                     f"encoder takes {self.input_shape}")
                self._preprocessor = pre
            return self._preprocessor

    def output_dim(self, name: str) -> int:
        if name == "features":
            return self.embed_dim
        if name == "cluster_probs" and self.num_clusters:
            return self.num_clusters
        shape = getattr(self.encoder, "output_shapes", {}).get(name)
        return int(shape[-1]) if shape else -1

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [MODEL_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.input_shape]}],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, self.output_dim(n)]} for n in self.output_names],
        }

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": self.max_batch_size,
            "input": [{"name": self.input_name, "data_type": "TYPE_FP32", "dims": list(self.input_shape)}],
            "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [self.output_dim(n)]} for n in self.output_names],
            "dynamic_batching": {"max_queue_delay_microseconds": int(round(self.max_queue_delay_s * 1e6))},
            "parameters": {"zoo_config": {"string_value": json.dumps(self.encoder.pretrained_cfg, default=str)}},
        }
