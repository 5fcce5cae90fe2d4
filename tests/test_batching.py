"""The batcher merges concurrent requests into single onnxruntime calls; settings refuse meaningless values."""

import asyncio
import os
import time

import numpy as np
import pytest

from bundle.runtime import Bundle
from serving.batching import Batcher
from tests.conftest import REPO


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(REPO / "models" / "cnn")


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_concurrent_requests_share_calls_and_get_their_own_rows(bundle):
    sizes = []
    batcher = Batcher(bundle, max_batch_size=256, max_latency_ms=50, on_batch=sizes.append)
    requests = [images(1 + i % 3, seed=i) for i in range(16)]

    async def all_at_once():
        return await asyncio.gather(*(batcher.predict(r) for r in requests))

    answers = asyncio.run(all_at_once())
    for request, answer in zip(requests, answers):
        np.testing.assert_allclose(answer.logits, bundle.predict(request).logits, atol=1e-5)
    assert sum(sizes) == sum(len(r) for r in requests)
    assert len(sizes) < len(requests)  # merged: fewer inference calls than requests


def test_a_request_larger_than_the_batch_bound_runs_as_several_calls(bundle):
    sizes = []
    batcher = Batcher(bundle, max_batch_size=4, max_latency_ms=0, on_batch=sizes.append)
    request = images(10, seed=3)
    answer = asyncio.run(batcher.predict(request))
    np.testing.assert_allclose(answer.embeddings, bundle.predict(request).embeddings, atol=1e-5)
    assert sizes == [4, 4, 2]  # no onnxruntime call above the bound: its memory grows with the call


def test_a_request_abandoned_while_queued_leaves_the_batcher_serving(bundle):
    sizes = []
    # the batcher waits up to 5 s for company, until the batch holds 3 images: the abandoned 2 and the next 1
    batcher = Batcher(bundle, max_batch_size=3, max_latency_ms=5000, on_batch=sizes.append)

    async def abandon_one_then_ask_again():
        abandoned = asyncio.create_task(batcher.predict(images(2, seed=0)))
        await asyncio.sleep(0.05)  # queued
        abandoned.cancel()
        return await asyncio.wait_for(batcher.predict(images(1, seed=1)), timeout=10)

    answer = asyncio.run(abandon_one_then_ask_again())
    np.testing.assert_allclose(answer.logits, bundle.predict(images(1, seed=1)).logits, atol=1e-5)
    assert sizes == [1]  # the abandoned request's images were not computed


def test_a_failing_batch_fails_its_requests_and_the_batcher_serves_on(bundle):
    """Whatever raises in a batch (onnxruntime, the batch-size metric), its requests learn of it, no
    request waits for an answer that will never come, and the next batch is computed as before."""
    failing = Bundle.load(REPO / "models" / "cnn")
    predict, broken = failing.predict, [True]

    def once_broken(images, session=0):
        if broken.pop() if broken else False:
            raise MemoryError("onnxruntime could not allocate")
        return predict(images, session)

    def unrecordable(size):
        raise OSError("the metrics folder is gone")

    failing.predict = once_broken
    batcher = Batcher(failing, max_batch_size=16, max_latency_ms=0, on_batch=unrecordable)

    async def fail_then_ask_again():
        with pytest.raises(MemoryError, match="could not allocate"):
            await asyncio.wait_for(batcher.predict(images(2, seed=0)), timeout=10)
        return await asyncio.wait_for(batcher.predict(images(1, seed=1)), timeout=10)

    answer = asyncio.run(fail_then_ask_again())
    np.testing.assert_allclose(answer.logits, bundle.predict(images(1, seed=1)).logits, atol=1e-5)
    assert batcher.computing == 0


def test_with_sessions_a_lone_batch_gets_every_thread_and_batches_under_load_run_side_by_side(bundle):
    split = Bundle.load(REPO / "models" / "cnn", threads=2, spinning=False, sessions=2)
    assert [s.get_session_options().intra_op_num_threads for s in split.sessions] == [2, 1, 1]
    uneven = Bundle.load(REPO / "models" / "cnn", threads=3, spinning=False, sessions=2)
    assert [s.get_session_options().intra_op_num_threads for s in uneven.sessions] == [3, 2, 1]  # no thread left out
    assert len(Bundle.load(REPO / "models" / "cnn", threads=None, sessions=2).sessions) == 1  # no thread count to split
    assert len(Bundle.load(REPO / "models" / "cnn", threads=1, sessions=2).sessions) == 1  # fewer threads than sessions
    with pytest.raises(ValueError, match="sessions must be at least 1"):
        Bundle.load(REPO / "models" / "cnn", sessions=0)
    calls, predict = [], split.predict

    def recorded(images, session=0):
        start = time.perf_counter()
        time.sleep(0.05)  # long enough for the next batch to start meanwhile
        answer = predict(images, session)
        calls.append((session, start, time.perf_counter()))
        return answer

    split.predict = recorded
    batcher = Batcher(split, max_batch_size=2, max_latency_ms=0)
    requests = [images(1 + i % 2, seed=i) for i in range(12)]

    async def alone_then_together():
        first = await batcher.predict(requests[0])
        return [first, *await asyncio.gather(*(batcher.predict(r) for r in requests[1:]))]

    answers = asyncio.run(alone_then_together())
    for request, answer in zip(requests, answers):
        np.testing.assert_allclose(answer.probabilities, bundle.predict(request).probabilities, atol=1e-5)
    assert calls[0][0] == 0  # alone: the session with every thread
    overlapping = [(a, b) for a in calls for b in calls if a is not b and a[1] < b[1] < a[2]]
    assert overlapping and all(a[0] != b[0] for a, b in overlapping)  # side by side, each on its own session


class Recorded:
    """An onnxruntime session whose calls take 50 ms longer and are recorded as (session, start, end)."""

    def __init__(self, index: int, session, calls: list):
        self.index, self.session, self.calls = index, session, calls

    def run(self, outputs, feed):
        start = time.perf_counter()
        time.sleep(0.05)
        answer = self.session.run(outputs, feed)
        self.calls.append((self.index, start, time.perf_counter()))
        return answer


def test_a_long_batch_that_began_alone_leaves_the_session_with_every_thread_once_another_starts(bundle):
    split = Bundle.load(REPO / "models" / "cnn", threads=2, spinning=False, sessions=2)
    calls: list = []
    split.sessions = [Recorded(i, session, calls) for i, session in enumerate(split.sessions)]
    batcher = Batcher(split, max_batch_size=1, max_latency_ms=0)

    async def long_then_short():
        long = asyncio.create_task(batcher.predict(images(20, seed=20)))  # 20 calls of at least 50 ms
        await asyncio.sleep(0.08)  # the long batch's second call is running
        await batcher.predict(images(1, seed=21))
        return await long

    answer = asyncio.run(long_then_short())
    np.testing.assert_allclose(answer.probabilities, bundle.predict(images(20, seed=20)).probabilities, atol=1e-5)
    assert calls[0][0] == 0  # alone: every thread
    assert any(c[0] != 0 for c in calls)  # then beside the short batch: its own session
    assert not [a for a in calls if a[0] == 0 for b in calls if b is not a and b[1] < a[1] < b[2]]  # session 0 never starts beside another call


@pytest.mark.parametrize(("name", "value"), [("MAX_CONCURRENCY", "0"), ("SESSIONS", "0"), ("MAX_QUEUE_WAIT_S", "-1"), ("MAX_QUEUE_WAIT_S", "inf"), ("TIMEOUT_S", "0"), ("TARGET_LATENCY_S", "-1"), ("BROKEN_BUNDLES", "ignore"), ("THREAD_SPINNING", "sometimes")])
def test_settings_refuse_values_without_meaning(monkeypatch, name, value):
    from serving.settings import Settings

    monkeypatch.setenv(f"CIFAR10_{name}", value)
    with pytest.raises(ValueError, match=f"CIFAR10_{name}"):
        Settings.from_env()


@pytest.mark.parametrize(("cpu_max", "expected"), [("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), ("odd", None)])
def test_threads_default_to_the_containers_cpu_quota(tmp_path, cpu_max, expected):
    from bundle.runtime import available_cores

    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cpu_set = len(os.sched_getaffinity(0))
    assert available_cores(path) == min(cpu_set, expected or cpu_set)
    assert available_cores(tmp_path / "absent") == cpu_set


def test_threads_default_to_the_cores_shared_among_the_workers():
    from bundle.runtime import available_cores
    from serving.settings import Settings

    assert Settings().threads == available_cores()
    assert Settings(workers=2).threads == max(1, available_cores() // 2)
    assert Settings(workers=2, threads=0).threads == 0  # 0: onnxruntime's own choice, kept


def test_the_service_lets_onnxruntime_threads_sleep_unless_told(monkeypatch):
    from serving.service import load_bundle
    from serving.settings import Settings

    def spinning(settings) -> bool:
        options = load_bundle(REPO / "models" / "cnn", ["CPUExecutionProvider"], settings).session.get_session_options()
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return True

    assert not spinning(Settings.from_env())
    monkeypatch.setenv("CIFAR10_THREAD_SPINNING", "1")
    assert spinning(Settings.from_env())
