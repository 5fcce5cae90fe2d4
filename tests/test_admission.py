"""Admission's queue: places go to waiting requests first come first served; a full queue, a wait past
CIFAR10_MAX_QUEUE_WAIT_S or a client gone never leaks a place. Its limit: settles at rate × target
under saturation, comes back when requests are fast, and a lowered one holds places back. Run on a
real event loop against a minimal ASGI app whose requests finish when the test says (a live server:
tests/test_faults.py)."""

import asyncio
import collections
import json

import pytest

from serving.admission import WINDOW, Admission, LatencyLimit, ServiceTime


class App:
    """An ASGI app whose requests each wait for their own event before answering 200."""

    def __init__(self):
        self.started: list[str] = []
        self.finish: dict[str, asyncio.Event] = {}

    async def __call__(self, scope, receive, send):
        name = scope["query_string"].decode()
        self.started.append(name)
        await receive()  # its body, as every endpoint reads it before answering
        await self.finish.setdefault(name, asyncio.Event()).wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def release(self, name: str) -> None:
        """Let request `name` answer, now or as soon as it starts."""
        self.finish.setdefault(name, asyncio.Event()).set()


async def call(admission: Admission, name: str) -> tuple[int, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": "/classify", "query_string": name.encode()}
    await admission(scope, receive, send)
    body = json.loads(sent[1]["body"]) if sent[1]["body"] else {}
    return sent[0]["status"], body


def admission(app: App, max_concurrency: int = 1, max_queue: int = 2, wait: float = 10.0) -> Admission:
    return Admission(app, admits=lambda path: True, max_concurrency=max_concurrency, max_queue=max_queue, max_queue_wait_s=wait)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def holding(gate: Admission, name: str) -> asyncio.Task:
    """Request `name` sent, and in flight or waiting by the time this returns."""
    task = asyncio.create_task(call(gate, name))
    await settle()
    return task


def test_waiting_requests_get_places_in_order_and_a_full_queue_is_refused_at_once():
    async def scenario():
        app = App()
        gate = admission(app)
        tasks = {name: asyncio.create_task(call(gate, name)) for name in "abc"}
        await settle()
        assert app.started == ["a"] and len(gate.waiting) == 2  # b and c wait
        status, body = await asyncio.wait_for(call(gate, "d"), 1)  # the queue is full: refused at once
        assert status == 429 and "CIFAR10_MAX_CONCURRENCY" in body["error"]
        app.release("a")
        await settle()
        assert app.started == ["a", "b"]
        late = asyncio.create_task(call(gate, "e"))  # a place in the queue again, behind c
        await settle()
        for name in "bc":
            app.release(name)
            await settle()
        app.release("e")
        results = await asyncio.gather(*tasks.values(), late)
        assert [status for status, _ in results] == [200, 200, 200, 200] and app.started == ["a", "b", "c", "e"]
        assert gate.in_flight == 0 and not gate.waiting

    asyncio.run(scenario())


def test_a_wait_past_the_limit_is_refused_and_leaks_no_place():
    async def scenario():
        app = App()
        gate = admission(app, wait=0.05)
        first = await holding(gate, "a")
        status, body = await call(gate, "b")
        assert status == 429 and "CIFAR10_MAX_QUEUE_WAIT_S=0.05" in body["error"]
        app.release("a")
        assert (await first)[0] == 200 and gate.in_flight == 0 and not gate.waiting

    asyncio.run(scenario())


def test_a_client_gone_while_waiting_leaks_no_place():
    async def scenario():
        app = App()
        gate = admission(app)
        first = await holding(gate, "a")
        gone = await holding(gate, "b")
        gone.cancel()
        await settle()
        assert not gate.waiting
        app.release("a")
        await first
        assert gate.in_flight == 0
        app.release("c")
        assert (await asyncio.wait_for(call(gate, "c"), 1))[0] == 200  # the place came back

    asyncio.run(scenario())


def test_without_a_queue_the_next_request_is_refused_at_once():
    async def scenario():
        app = App()
        gate = admission(app, max_queue=0)
        first = await holding(gate, "a")
        assert (await asyncio.wait_for(call(gate, "b"), 1))[0] == 429
        app.release("a")
        await first

    asyncio.run(scenario())


def test_a_client_gone_just_as_it_was_handed_a_place_passes_the_place_on():
    async def scenario():
        app = App()
        gate = admission(app)
        first, handed, third = await holding(gate, "a"), await holding(gate, "b"), await holding(gate, "c")
        app.release("a")
        await first  # a's place is b's now, and b has not run since
        handed.cancel()
        await settle()
        assert app.started == ["a", "c"] and handed.cancelled()
        app.release("c")
        assert (await third)[0] == 200 and gate.in_flight == 0 and not gate.waiting

    asyncio.run(scenario())


def test_a_request_that_fails_frees_its_place_and_other_paths_pass_without_one():
    async def failing(scope, receive, send):
        if scope["path"] == "/classify":
            raise RuntimeError("a fault of the endpoint")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def scenario():
        gate = Admission(failing, admits=lambda path: path == "/classify", max_concurrency=1, max_queue=0, max_queue_wait_s=0)
        for _ in range(2):  # the second is admitted, not refused: the first's place came back
            with pytest.raises(RuntimeError, match="a fault"):
                await call(gate, "a")
            assert gate.in_flight == 0
        sent = []

        async def send(message):
            sent.append(message)

        gate.in_flight = gate.limit.value  # full: a path it does not admit is not held back
        await gate({"type": "http", "path": "/models", "query_string": b""}, None, send)
        assert sent[0]["status"] == 200

    asyncio.run(scenario())


def saturated(limit: LatencyLimit, rate: float, requests: int = 4000) -> list[int]:
    """The limit after each of `requests` that finish at a worker serving `rate` requests/s one after another in
    the order admitted, with more always waiting: each took, from its admission, the work of those admitted
    before it and its own (Little's law)."""
    now, in_service, values = 0.0, collections.deque(), []  # (admitted at, the limit's moves then), oldest first
    for _ in range(requests):
        while len(in_service) < limit.value:
            in_service.append((now, limit.moves))
            limit.every_place_taken()  # more are waiting
        now += 1 / rate
        admitted, moves = in_service.popleft()
        limit.observe(now - admitted, moves)
        values.append(limit.value)
    return values


@pytest.mark.parametrize("rate", [6.0, 40.0, 60.0, 100.0, 230.0])
def test_under_saturation_the_limit_settles_where_rate_times_target_fills_it(rate):
    values = saturated(LatencyLimit(maximum=64, target_s=0.5), rate)
    expected = min(64, max(2, rate * 0.5))  # rate × target, within the bounds
    settled = set(values[len(values) // 2 :])  # and stays there
    assert all(abs(value - expected) <= max(1, 0.1 * expected) for value in settled), (rate, sorted(settled))


def test_requests_faster_than_the_target_raise_the_limit_back_to_its_maximum():
    limit = LatencyLimit(maximum=64, target_s=1.0)
    saturated(limit, rate=1.0)
    assert limit.value == 2  # the floor: two requests take two seconds
    for _ in range(6 * 16):
        limit.observe(0.02, limit.moves)
    assert limit.value == 64


def test_slow_requests_lower_the_limit_only_when_every_place_was_taken():
    limit = LatencyLimit(maximum=64, target_s=0.5)
    assert not any(limit.observe(3.0, 0) for _ in range(100)) and limit.value == 64  # a lone client's slow requests
    limit.every_place_taken()
    assert any(limit.observe(3.0, 0) for _ in range(16)) and limit.value == 32


def test_without_a_target_the_limit_never_moves():
    limit = LatencyLimit(maximum=8, target_s=0.0)
    limit.every_place_taken()
    assert not any(limit.observe(30.0, 0) for _ in range(100)) and limit.value == 8


def test_time_in_service_runs_from_the_last_body_part_to_the_answer_and_skips_refusals():
    async def scenario(status: int):
        parts = [{"type": "http.request", "body": b"a", "more_body": True}, {"type": "http.request", "body": b"b"}]

        async def receive():
            await asyncio.sleep(0.5)  # a slow upload: a second in all
            return parts.pop(0)

        async def send(message):
            pass

        timed = ServiceTime(receive, send)
        await timed.receive(), await timed.receive()
        await asyncio.sleep(0.05)  # the work
        await timed.send({"type": "http.response.start", "status": status, "headers": []})
        return timed.seconds

    assert 0.05 <= asyncio.run(scenario(200)) < 0.5
    assert asyncio.run(scenario(504)) >= 0.05  # a timeout says the worker is slow
    assert asyncio.run(scenario(400)) is None and asyncio.run(scenario(500)) is None


def test_a_timeout_while_the_body_still_trickles_in_does_not_count_as_time_in_service():
    async def scenario():
        async def receive():
            return {"type": "http.request", "body": b"a", "more_body": True}  # and more, some day

        async def send(message):
            pass

        timed = ServiceTime(receive, send)
        await timed.receive()
        await timed.send({"type": "http.response.start", "status": 504, "headers": []})
        return timed.seconds

    assert asyncio.run(scenario()) is None


def test_a_lowered_limit_holds_freed_places_back_and_a_raised_one_hands_them_out_at_once():
    async def scenario():
        app = App()
        told = []
        gate = Admission(app, admits=lambda path: True, max_concurrency=4, max_queue=8, max_queue_wait_s=10, target_latency_s=0.001, on_limit=told.append)
        tasks = [await holding(gate, name) for name in "abcdefgh"]
        assert app.started == list("abcd") and len(gate.waiting) == 4
        gate.limit._window = [1.0] * (WINDOW - 1)  # requests that took far longer than the target: one more closes the window
        app.release("a")
        await settle()
        assert told == [2] and gate.limit.value == 2
        assert app.started == list("abcd") and gate.in_flight == 3  # a's place is not handed on: 3 run, over the new limit
        for name in "bc":
            app.release(name)
        await settle()
        assert app.started == list("abcde") and gate.in_flight == 2  # b's place is not handed on either; c's is, to e
        gate.limit.target_s = 10.0  # now requests are far faster than the target
        gate.limit._window = [0.01] * (WINDOW - 1)
        app.release("d")  # admitted before the limit moved: its time does not count
        await settle()
        assert told == [2] and gate.in_flight == 2  # d's place went to f
        app.release("e")  # admitted after it: closes the window
        await settle()
        assert told == [2, 4] and app.started == list("abcdefgh") and gate.in_flight == 3  # f, and g and h at once
        for name in "fgh":
            app.release(name)
        results = await asyncio.gather(*tasks)
        assert [status for status, body in results] == [200] * 8 and gate.in_flight == 0 and not gate.waiting

    asyncio.run(scenario())


def test_a_refusal_under_a_lowered_limit_names_both_settings():
    async def scenario():
        app = App()
        gate = Admission(app, admits=lambda path: True, max_concurrency=8, max_queue=0, max_queue_wait_s=0, target_latency_s=0.25)
        gate.limit.value = 2
        first, second = await holding(gate, "a"), await holding(gate, "b")
        status, body = await call(gate, "c")
        assert status == 429 and "CIFAR10_MAX_CONCURRENCY=8" in body["error"] and "CIFAR10_TARGET_LATENCY_S=0.25" in body["error"]
        app.release("a")
        app.release("b")
        await asyncio.gather(first, second)

    asyncio.run(scenario())
