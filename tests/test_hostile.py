"""Hostile clients against a real `bentoml serve`: the upload catalogue, API fuzzing, pickles.

Every answer is a 4xx with a JSON error (or a 200 where the input is legitimate), never a 5xx;
the server's memory stays flat; nothing the client sends is unpickled or fetched.
"""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.harness import SERVE, running
from bench.hostile import catalogue, check, encode, picture, run
from bundle.runtime import Bundle, BundleError
from tests.conftest import REPO

CASES = catalogue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running(SERVE, log, env={"CIFAR10_MODELS_DIR": str(REPO / "models"), "CIFAR10_DEFAULT_MODEL": "cnn"}) as served:
        yield served


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_upload_gets_its_answer_and_the_next_request_succeeds(server, name):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = CASES[name].send(client)
        assert check(CASES[name], answer) == ""
        assert answer.status_code < 500 and answer.headers["content-type"] == "application/json"
        good = client.post("/classify", files=[("images", ("good.png", encode(picture(7), "PNG"), "image/png"))])
    assert good.status_code == 200


def test_the_catalogue_three_times_over_leaves_memory_flat(server):
    """After a warm-up round, three more rounds of every case grow the server by less than 32 MiB."""
    _, before, after = run(server.url, lambda: server.rss, rounds=3)
    assert after - before < 32 * 2**20, f"{(after - before) / 2**20:.1f} MiB more"


# the bounded run in CI; a long one: CIFAR10_FUZZ_EXAMPLES=1000 pytest -s tests/test_hostile.py -k schemathesis
FUZZ_EXAMPLES = os.environ.get("CIFAR10_FUZZ_EXAMPLES", "25")


def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, tmp_path):
    """Every schemathesis check but positive_data_acceptance: a schema cannot say which bytes make an
    acceptable image, so a schema-valid 1×1 PNG is rightly refused (docs/operations.md)."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    command = [
        str(schemathesis), "run", f"{server.url}/docs.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", FUZZ_EXAMPLES, "--no-color", *(["--seed", "1"] if "CI" in os.environ else []),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=tmp_path)
    print(result.stdout[result.stdout.find("SUMMARY") :])
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and "failures" not in result.stdout.split("SUMMARY")[-1].lower()


class WritesAFile:
    """Unpickling this writes `path`: the proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_the_payload_below_really_writes_its_file_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesAFile(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("content_type", ["application/vnd.bentoml+pickle", "Application/Vnd.Bentoml+Pickle", "application/vnd.bentoml+pickle; x=1"])
def test_request_bodies_are_never_unpickled(server, tmp_path, content_type):
    marker = tmp_path / "marker"
    answer = httpx.post(f"{server.url}/classify", content=pickle.dumps(WritesAFile(marker)), headers={"Content-Type": content_type}, timeout=30)
    assert 400 <= answer.status_code < 500, answer.text
    assert not marker.exists()


def test_a_tampered_knn_pickle_is_refused_before_it_is_loaded(tmp_path):
    bundle = tmp_path / "cnn"
    shutil.copytree(REPO / "models" / "cnn", bundle)
    marker = tmp_path / "marker"
    (bundle / "knn.pkl").write_bytes(pickle.dumps(WritesAFile(marker)))
    with pytest.raises(BundleError, match="knn.pkl: sha256 .* does not match the manifest"):
        Bundle.load(bundle)
    assert not marker.exists()
