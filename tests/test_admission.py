"""Admission's queue: places go to waiting requests first come first served; a full queue, a wait past
CIFAR10_MAX_QUEUE_WAIT_S or a client gone never leaks a place. Run on a real event loop against a
minimal ASGI app whose requests finish when the test says (a live server: tests/test_faults.py)."""

import asyncio
import json

import pytest

from serving.errors import Admission


class App:
    """An ASGI app whose requests each wait for their own event before answering 200."""

    def __init__(self):
        self.started: list[str] = []
        self.finish: dict[str, asyncio.Event] = {}

    async def __call__(self, scope, receive, send):
        name = scope["query_string"].decode()
        self.started.append(name)
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

    scope = {"type": "http", "path": "/classify", "query_string": name.encode()}
    await admission(scope, None, send)
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

        gate.in_flight = gate.max_concurrency  # full: a path it does not admit is not held back
        await gate({"type": "http", "path": "/models", "query_string": b""}, None, send)
        assert sent[0]["status"] == 200

    asyncio.run(scenario())
