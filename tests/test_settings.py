"""The service's settings: each default written once (serving/settings.py), and the README and bentofile true to it."""

import dataclasses
import re
from pathlib import Path

import pytest

from bundle.manifest import MODELS_DIR
from serving.settings import Settings, env_name
from tests.conftest import REPO

SETTINGS = {env_name(f.name): f for f in dataclasses.fields(Settings)}


def readme_table() -> dict[str, str]:
    """The README's settings table: name → its default column, backticks removed."""
    rows = re.findall(r"^\| `(CIFAR10_[A-Z_]+)` \| ([^|]+) \|", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    return {name: default.strip().strip("`") for name, default in rows}


def written(value) -> str | None:
    """A default as the README writes it; None for the ones it describes in words (empty, computed)."""
    if value in (None, ()):
        return None
    if isinstance(value, bool):
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_readme_lists_every_setting_with_its_default():
    table = readme_table()
    assert set(table) == set(SETTINGS), f"README only: {set(table) - set(SETTINGS)}; settings only: {set(SETTINGS) - set(table)}"
    for name, f in SETTINGS.items():
        if (value := written(f.default)) is not None:
            assert table[name] == value, f"README says {name} defaults to {table[name]!r}, serving/settings.py to {value!r}"


def test_every_setting_is_read_from_its_variable_and_parsed_by_type():
    given = {"CIFAR10_MODELS": "cnn, airbench", "CIFAR10_THREADS": "3", "CIFAR10_THREAD_SPINNING": "yes",
             "CIFAR10_MAX_LATENCY_MS": "2.5", "CIFAR10_MAX_PIXELS": "1000", "CIFAR10_MODELS_DIR": "/srv/models"}  # fmt: skip
    settings = Settings.from_env(given)
    assert settings.models == ("cnn", "airbench") and settings.threads == 3 and settings.thread_spinning is True
    assert settings.max_latency_ms == 2.5 and settings.limits.max_pixels == 1000 and str(settings.models_dir) == "/srv/models"
    assert settings.limits.pixels_setting == "CIFAR10_MAX_PIXELS"  # what a refusal tells the operator to raise
    assert Settings.from_env({}) == Settings()
    # an empty folder setting is unset, for the service as for the command line (cifar10/cli.py)
    assert Settings.from_env({"CIFAR10_MODELS_DIR": ""}).models_dir == Settings().models_dir == Path(MODELS_DIR)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"CIFAR10_MAX_IMAGES": "many"}, "CIFAR10_MAX_IMAGES='many' (must be an integer)"),
        ({"CIFAR10_TIMEOUT_S": "soon"}, "CIFAR10_TIMEOUT_S='soon' (must be a number)"),
        ({"CIFAR10_MAX_PIXELS": "0"}, "CIFAR10_MAX_PIXELS=0 (must be > 0)"),
        ({"CIFAR10_CORS_ORIGINS": "https://app.example/, *, app2.example, https://App.example, https://a.example:443, http://b.example:8080"},
         "CIFAR10_CORS_ORIGINS='https://app.example/,app2.example,https://App.example,https://a.example:443' (each origin as a browser sends it"),
        ({"CIFAR10_THREAD_SPINNING": "maybe"}, "CIFAR10_THREAD_SPINNING='maybe' (must be 0 or 1)"),
        ({"CIFAR10_MAX_CONCURENCY": "8"}, "CIFAR10_MAX_CONCURENCY is no setting (did you mean CIFAR10_MAX_CONCURRENCY?)"),
        ({"CIFAR10_WORKER": "2"}, "CIFAR10_WORKER is no setting (did you mean CIFAR10_WORKERS?)"),
    ],
)
def test_a_setting_without_meaning_is_named(given, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env(given)


def test_other_cifar10_variables_are_left_alone():
    """The test suite's and the CLI's own variables are not a setting's typo."""
    assert Settings.from_env({"CIFAR10_DATA_DIR": "/data", "CIFAR10_TEST_DATA": "/data", "CIFAR10_DEBUG": "1"}) == Settings()
