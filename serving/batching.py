"""Adaptive batching: concurrent requests for one bundle share a single onnxruntime call.

Requests (coroutines on a worker's event loop) put their decoded images on a queue and await
their rows; an executor thread takes everything queued (up to max_batch_size images, waiting
at most max_latency_ms for more once it has some), runs it (in onnxruntime calls of at most
max_batch_size images, a larger request's too), and hands each request its rows. Idle, a request runs at once; under load, batches grow by themselves while the
previous one computes.

A bundle loaded with `sessions` > 1 (CIFAR10_SESSIONS) gets that many executors, all taking from
the one queue (Triton's instance groups). While no other batch computes, an executor runs its
calls on the session with every thread, so a lone request gets every core; while another
computes, on its own session, of its share of the threads. Under load the batches
then run side by side, and the cores stay busy while Python splits one batch's answers and
gathers the next: the small CNN, whose cost is Python more than the model, gains most
(docs/performance.md).

BentoML's own batching (`batchable=True`) merges only HTTP calls to an endpoint whose single
parameter is the batch; ours take a list of uploads plus `model` and `k`, so the merge happens
here, after decoding, where every request is already a uint8 array.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from bundle.runtime import Bundle, Prediction

log = logging.getLogger("bentoml.cifar10.batching")


class Batcher:
    def __init__(self, bundle: Bundle, max_batch_size: int, max_latency_ms: float, on_batch=None):
        self.bundle = bundle
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000
        self.queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue()  # bounded upstream: CIFAR10_MAX_CONCURRENCY requests per worker
        self.on_batch = on_batch or (lambda size: None)  # e.g. a histogram of batch sizes
        self.computing = 0  # batches running now, counted under the lock
        self.lock = threading.Lock()
        own = range(1, len(bundle.sessions)) or [0]  # each executor's session; 0 has every thread
        for session in own:
            threading.Thread(target=self._run, args=(session,), name=f"batcher-{bundle.manifest.name}-{session}", daemon=True).start()

    async def predict(self, images: np.ndarray) -> Prediction:
        """The rows of `images` from the next batch; the caller's event loop goes on meanwhile."""
        future: Future = Future()
        self.queue.put((images, future))
        return await asyncio.wrap_future(future)

    def _collect(self) -> list[tuple[np.ndarray, Future]]:
        batch = [self.queue.get()]
        size, deadline = len(batch[0][0]), time.monotonic() + self.max_latency
        while size < self.max_batch_size:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic())) if self.max_latency else self.queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            size += len(item[0])
        return batch

    def _run(self, session: int) -> None:
        while True:
            # a request abandoned while queued (its client gone, its time out) is dropped, not computed
            batch = [(images, future) for images, future in self._collect() if future.set_running_or_notify_cancel()]
            if batch:
                self._serve(batch, session)

    def _session(self, own: int) -> int:
        """Session 0, with every thread, while this executor's batch is the only one computing; else its own."""
        with self.lock:
            return 0 if self.computing == 1 else own

    def _serve(self, batch: list[tuple[np.ndarray, Future]], session: int) -> None:
        """Compute one batch and hand each request its rows; whatever fails, each request learns of it
        and the executor lives on, so no request waits for an answer that will never come."""
        try:
            calls = self._compute(np.concatenate([images for images, _ in batch]), session)
            prediction = Prediction.concatenate(calls)
            self._record(calls)  # before the answers, so a client that reads /metrics after its answer sees its batch
            start = 0
            for images, future in batch:
                future.set_result(prediction[start : start + len(images)])
                start += len(images)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)

    def _compute(self, pixels: np.ndarray, session: int) -> list[Prediction]:
        """Calls of at most max_batch_size images, a larger request's too (onnxruntime's arena keeps the largest
        call's memory), each choosing its session as it starts: a long batch that began alone moves off the
        session with every thread once another starts, rather than oversubscribing the cores to its end.
        The batch stops counting as computing before any request hears of it."""
        with self.lock:
            self.computing += 1
        try:
            step = self.max_batch_size
            return [self.bundle.predict(pixels[i : i + step], self._session(session)) for i in range(0, len(pixels), step)]
        finally:
            with self.lock:
                self.computing -= 1

    def _record(self, calls: list[Prediction]) -> None:
        try:
            for call in calls:
                self.on_batch(len(call.logits))
        except Exception:  # a metric that cannot be recorded must not stop the serving
            log.exception("recording the batch size failed")
