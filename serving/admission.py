"""Load shedding: how many requests a worker serves at once, and what the next ones get.

`Admission` lets at most `limit.value` requests to the paths it admits run at once (image
endpoints and `/v2` infer). The next ones wait, first come first served, at most
`max_queue_wait_s` and at most `max_queue` of them; then 429 with Retry-After, never an unbounded
queue past the clients' deadlines. The short wait is what keeps a retry storm (clients that resend
at once on every 429) from spending the cores on refusals: each waiting request holds only its
connection, not a body or a thread.

`Abandonment` stops the work of a request whose client has gone.

`LatencyLimit` sets how many run at once. A fixed number suits one model on one machine only:
64 requests are a fraction of a second of work for the study CNN and several seconds for the
default bundle on a slow CPU, and every admitted request waits for the work of those ahead of it.
So, in the spirit of Envoy's adaptive concurrency filter and Netflix's concurrency-limits, the
number follows a latency target: it falls while the admitted requests' median time in service is
above the target and all places are taken, and rises back, up to `max_concurrency`, while it is
below. Under saturation the median is places / rate (Little's law), so the places settle where
the worker's rate times the target fills them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
from collections.abc import Callable

from serving.errors import send_error

log = logging.getLogger("bentoml.cifar10.admission")  # BentoML's server shows its own logger tree only

MIN_CONCURRENCY = 2  # never fewer at once: one request decoding while another computes
WINDOW = 8  # requests (at least) whose median time in service moves the limit once
WATCHED_BYTES = 64 * 1024  # requests at least this large stop when their client leaves (Abandonment)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it: what the request metrics count; the client never sees it


class LatencyLimit:
    """How many requests to admit at once: `maximum`, lowered while their median time in service is above `target_s`.

    Each window of requests moves the limit by the square root of target / median (at most ×2 or
    ×½), so that under saturation, where the median is limit / rate, it closes half the remaining
    gap (in logarithm) per window. Only requests admitted since the last move count: the ones
    admitted before it waited behind the old number of places, and counting them would overshoot.
    It is lowered only when some request found every place taken: a lone client's slow requests
    would not be served sooner with fewer places. `target_s` 0 keeps it at `maximum`.
    """

    def __init__(self, maximum: int, target_s: float, minimum: int = MIN_CONCURRENCY):
        self.maximum, self.target_s = maximum, target_s
        self.minimum = min(minimum, maximum)
        self.value = maximum
        self.moves = 0  # how often the value has moved: a request admitted under an older value does not count
        self._saturated = False  # whether a request found every place taken during this window
        self._window: list[float] = []

    def every_place_taken(self) -> None:
        """A request found no free place: only then may the window that ends next lower the limit."""
        self._saturated = True

    def observe(self, seconds: float, admitted_at_move: int) -> bool:
        """The time in service of a request admitted when `moves` was `admitted_at_move`; True when the limit moved."""
        if self.target_s <= 0 or admitted_at_move != self.moves:
            return False
        self._window.append(seconds)
        if len(self._window) < max(WINDOW, self.value // 4):
            return False
        median = statistics.median(self._window)
        saturated, self._saturated = self._saturated, False
        self._window.clear()
        step = math.sqrt(min(4.0, max(0.25, self.target_s / max(median, 1e-6))))
        if step < 1 and not saturated:
            return False
        moved = min(self.maximum, max(self.minimum, math.ceil(self.value * step) if step > 1 else math.floor(self.value * step)))
        if moved == self.value:
            return False
        self.value, self.moves = moved, self.moves + 1
        return True


class Admission:
    """At most `limit.value` requests to the paths it `admits` in flight; the next wait for a place, or get 429."""

    def __init__(
        self, app, admits: Callable[[str], bool], max_concurrency: int, max_queue: int, max_queue_wait_s: float,
        target_latency_s: float = 0.0, on_limit: Callable[[int], None] = lambda value: None,
    ):  # fmt: skip
        self.app = app
        self.admits = admits
        self.limit = LatencyLimit(max_concurrency, target_latency_s)
        self.on_limit = on_limit  # told each new limit (the service's metric)
        self.max_queue, self.max_queue_wait_s = max_queue, max_queue_wait_s
        self.in_flight = 0  # one event loop per worker: no lock needed
        self.waiting: collections.deque[asyncio.Future] = collections.deque()  # oldest first; a freed place goes to it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.admits(scope["path"]):
            return await self.app(scope, receive, send)
        if self.in_flight < self.limit.value and not self.waiting:
            self.in_flight += 1
        else:
            self.limit.every_place_taken()
            if refused := await self._wait_for_a_place():
                return await send_error(send, 429, f"{self._full()}, {refused}; retry later", ((b"retry-after", b"1"),))
        admitted_at_move = self.limit.moves
        timed = ServiceTime(receive, send)
        try:
            await self.app(scope, timed.receive, timed.send)
        finally:
            moved = timed.seconds is not None and self.limit.observe(timed.seconds, admitted_at_move)
            self._release()
            if moved:
                self.on_limit(self.limit.value)

    def _full(self) -> str:
        if self.limit.value == self.limit.maximum:
            return f"{self.in_flight} requests in flight, the limit of this worker (CIFAR10_MAX_CONCURRENCY)"
        return (
            f"{self.in_flight} requests in flight, {self.limit.value} admitted at once now (CIFAR10_MAX_CONCURRENCY="
            f"{self.limit.maximum}, lowered while requests take longer than CIFAR10_TARGET_LATENCY_S={self.limit.target_s:g})"
        )

    async def _wait_for_a_place(self) -> str:
        """"" once a finishing request has handed this one its place; else why it is refused."""
        if len(self.waiting) >= self.max_queue or self.max_queue_wait_s <= 0:
            return f"and {len(self.waiting)} more waiting for a place (CIFAR10_MAX_QUEUE={self.max_queue})"
        place = asyncio.get_running_loop().create_future()
        self.waiting.append(place)
        try:
            async with asyncio.timeout(self.max_queue_wait_s):  # unlike wait_for in 3.11, never swallows a cancellation
                await asyncio.shield(place)
            return ""
        except TimeoutError:
            if place.done():  # handed over in the same instant: take it
                return ""
            self.waiting.remove(place)
            return f"and none finished within CIFAR10_MAX_QUEUE_WAIT_S={self.max_queue_wait_s:g}"
        except asyncio.CancelledError:  # the client went away while waiting
            if place.done():
                self._release()  # pass on the place it was handed
            else:
                self.waiting.remove(place)
            raise

    def _release(self) -> None:
        """A request finished: places free under the limit go to the oldest waiting requests."""
        self.in_flight -= 1
        while self.waiting and self.in_flight < self.limit.value:
            self.in_flight += 1
            self.waiting.popleft().set_result(None)


class Abandonment:
    """A request whose client has gone stops where it is: decoding (at its next image) or waiting
    for its batch (dropped from it). uvicorn only notes a disconnect, and nothing above it listens,
    so without this the work would be done for nobody, and under a storm of clients that time out
    and resend, done again and again.

    Once the body is in, a watcher waits for the client's next message, which on HTTP/1.1 can only be
    `http.disconnect`, and cancels the request's task; it stops as the answer starts. The request
    then answers 499 (nginx's "client closed request"), which uvicorn drops: without an answer,
    BentoML's timeout would hold the request, and its place in Admission, for CIFAR10_TIMEOUT_S.
    The watcher costs a task per request (0.94× the study CNN's single-image requests when each had
    one, docs/operations.md), so only requests declaring WATCHED_BYTES or more get one: those whose
    work is worth stopping. (A chunked request, without a Content-Length, is not watched.)"""

    def __init__(self, app, watches: Callable[[str], bool]):
        self.app = app
        self.watches = watches

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.watches(scope["path"]) or _length(scope) < WATCHED_BYTES:
            return await self.app(scope, receive, send)
        task, gone, watcher = asyncio.current_task(), False, None

        async def watch():
            nonlocal gone
            if (await receive())["type"] == "http.disconnect":
                gone = True
                task.cancel()

        async def receiving():
            nonlocal watcher
            message = await receive()
            if watcher is None and message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            return message

        async def sending(message):
            if watcher is not None:
                watcher.cancel()  # answering: the work is done
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the cancellation was ours, for a client that is gone
            log.info("%s %s: the client left before its answer; its work stopped", scope["method"], scope["path"])
            await send_error(send, CLIENT_CLOSED_REQUEST, "the client closed the connection before its answer")
        finally:
            if watcher is not None:
                watcher.cancel()


def _length(scope) -> int:
    declared = dict(scope["headers"]).get(b"content-length", b"")
    return int(declared) if declared.isdigit() else 0


class ServiceTime:
    """A request's time in service: from its body's last byte to its answer's start, so that a slow
    upload or a slow reader does not count as the worker's. None for answers that say nothing about
    the worker's speed: refusals of bad requests (4xx) and faults (500); a 504 counts, unless the
    body never came whole (a client trickling its upload is slow, not the worker)."""

    def __init__(self, receive, send):
        self._receive, self._send = receive, send
        self.received: float | None = None  # when the body's last part came
        self.seconds: float | None = None

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.received = time.monotonic()
        return message

    async def send(self, message):
        status = message.get("status", 0)
        if message["type"] == "http.response.start" and self.received is not None and (status < 400 or status == 504):
            self.seconds = time.monotonic() - self.received
        await self._send(message)
