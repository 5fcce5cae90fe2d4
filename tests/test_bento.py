"""`bentoml build` from the repository root, then `bentoml serve <tag>` from another directory."""

import os
import subprocess
import sys

import httpx

from bench.harness import running
from tests.conftest import REPO


def test_the_built_bento_serves_from_anywhere(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"))
    bentoml = [sys.executable, "-m", "bentoml"]
    built = subprocess.run([*bentoml, "build", "--output", "tag"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("cifar10:")
    source = tmp_path / "bentoml" / "bentos" / "cifar10" / tag.split(":")[1] / "src"
    assert (source / "models" / "airbench" / "knn.npz").is_file() and (source / "serving" / "service.py").is_file()
    assert (source / "bundle" / "runtime.py").is_file()
    carried = {p.parent.name for p in source.rglob("*.py")}
    assert carried == {"bundle", "serving"}, f"the bento carries the bundle contract and the service only, not {carried - {'bundle', 'serving'}}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [*bentoml, "serve", tag, "--host", "127.0.0.1", "--port", "{port}"]
    with running(command, tmp_path / "serve.log", env=env, cwd=elsewhere) as server:
        models = httpx.post(f"{server.url}/models", json={}, timeout=10).json()
        assert [m["name"] for m in models] == ["airbench", "cnn"]


def test_the_bentofile_states_the_settings_defaults(monkeypatch):
    import dataclasses

    import yaml

    from serving.settings import Settings

    envs = {e["name"]: str(e["value"]) for e in yaml.safe_load((REPO / "bentofile.yaml").read_text())["envs"]}
    assert envs.pop("CIFAR10_PROVIDERS") == "CPUExecutionProvider" and "CIFAR10_THREADS" not in envs
    known = {f"CIFAR10_{f.name.upper()}" for f in dataclasses.fields(Settings) if f.name != "limits"} | {"CIFAR10_MAX_PIXELS"}
    assert set(envs) <= known, f"bentofile.yaml names settings that do not exist: {set(envs) - known}"
    for name in envs:
        monkeypatch.delenv(name, raising=False)
    defaults = Settings.from_env()
    for name, value in envs.items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env() == defaults, "bentofile.yaml's envs differ from serving/settings.py's defaults"


def test_the_bento_installs_the_serving_dependencies():
    """The image gets what `pip install cifar10-serve` gets (BentoML brings itself), uvicorn's fast paths included."""
    import tomllib

    import yaml
    from packaging.requirements import Requirement

    def names(requirements):
        return {Requirement(r).name.lower() for r in requirements}

    served = names(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]) - {"bentoml"}
    for bentofile in ("bentofile.yaml", "bentofile.gpu.yaml"):
        packages = {n.removesuffix("-gpu") for n in names(yaml.safe_load((REPO / bentofile).read_text())["python"]["packages"])}
        assert packages == served, f"{bentofile} installs {sorted(packages)}, pyproject.toml serves with {sorted(served)}"
