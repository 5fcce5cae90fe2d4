"""serving/boundary.py: the service starts only on a BentoML its mends were verified against, and says what moved."""

import importlib
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from serving import boundary
from tests.conftest import REPO


def test_the_installed_bentoml_is_a_verified_one_and_pyproject_pins_the_same_releases():
    boundary.check()  # the suite runs against what it verifies
    pinned = next(Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if r.startswith("bentoml"))
    assert pinned.specifier == boundary.VERIFIED, f"pyproject.toml asks for bentoml{pinned.specifier}, serving/boundary.py verified {boundary.VERIFIED}"


def test_an_unverified_bentoml_stops_the_service_at_start():
    """`bentoml serve` imports the service in its supervisor first: there, an unverified release ends it."""
    start = "import sys, bentoml; bentoml.__version__ = '1.5.0'; from bentoml_cli.cli import cli; sys.exit(cli())"
    command = [sys.executable, "-c", start, "serve", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "BentoML 1.5.0 is installed" in done.stderr and "serving/boundary.py" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("name", boundary.REPLACED + boundary.READ)
def test_an_internal_that_moved_is_named(monkeypatch, name):
    def owner(name: str) -> tuple[str, str]:  # the module and the module's attribute that `name` goes through
        module, _, path = name.partition(":")
        return module, path.split(".")[0]

    monkeypatch.delattr(importlib.import_module(owner(name)[0]), owner(name)[1])
    first = next(n for n in boundary.REPLACED + boundary.READ if owner(n) == owner(name))  # the check names the first it misses
    with pytest.raises(boundary.BentoMLMoved, match=re.escape(first)):
        boundary.check()


def test_a_replaced_method_that_is_now_only_inherited_is_named(monkeypatch):
    from _bentoml_impl.serde import MultipartSerde

    monkeypatch.delattr(MultipartSerde, "parse_request")  # JSONSerde's would still answer
    with pytest.raises(boundary.BentoMLMoved, match="MultipartSerde no longer defines parse_request itself"):
        boundary.check()


def test_a_response_media_type_is_worked_out_once_per_output_model(monkeypatch):
    from serving.service import CIFAR10  # importing the service applies the boundary

    output = CIFAR10.apis["classify"].output_spec
    calls = []
    schema = output.model_json_schema
    monkeypatch.setattr(output, "model_json_schema", lambda *a, **k: calls.append(1) or schema(*a, **k))
    assert output.mime_type() == output.mime_type() == "application/json"
    assert len(calls) <= 1
