"""The command line: one-line errors with a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cifar10.cli import main
from cifar10.errors import UserError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_prints_the_facts_and_writes_the_grid(tiny_cifar, tmp_path, capsys):
    code, out, err = run(capsys, "data", "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "facts"))
    assert code == 0, err
    assert "100 train, 20 test" in out and "32×32×3 (RGB, uint8)" in out
    assert "airplane         10      2" in out
    facts = json.loads((tmp_path / "facts" / "facts.json").read_text())
    assert facts["train_counts"] == [10] * 10 and facts["value_range"] == [0, 219]
    with Image.open(tmp_path / "facts" / "samples.png") as grid:
        assert grid.format == "PNG" and grid.width > 500 and grid.height > 500
        darkest, brightest = grid.convert("L").getextrema()
        assert brightest - darkest > 100  # thumbnails were drawn on the white page


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "cnn-nope"], "unknown recipe 'cnn-nope'"),
        (["train"], "name a recipe"),
        (["train", "cnn-baseline", "--data-dir", "/nonexistent/cifar"], "CIFAR-10 folder not found"),
        (["data", "--data-dir", "/nonexistent/cifar"], "--download"),
        (["train", "cnn-baseline", "--device", "tpu"], "unknown device"),
        (["quantize", "nope", "--models-dir", "models"], "no bundle 'nope' in"),
        (["quantize", "cnn", "--models-dir", "/nonexistent/models"], "no models folder /nonexistent/models"),
        (["train", "fast", "--weights", "imagenet"], "--weights and --freeze apply to the VGG recipes"),
        (["train", "cnn-baseline", "--limit", "-5"], "--limit must be at least 1, got -5"),
        (["data", "--per-class", "0"], "--per-class must be at least 1"),
        (["export", "runs/x", "--name", "my model"], "a bundle's name is a folder name"),
        (["export", "runs/x", "--name", "m", "--knn-components", "-1"], "--knn-components must be 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys):
    code, _, err = run(capsys, "train", "cnn-baseline", "--device", "cuda")
    assert code == 1 and "no CUDA GPU" in err


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "train", "--resume", str(tmp_path))
    assert code == 1 and "corrupt" in err
    code, _, err = run(capsys, "train", "--resume", str(tmp_path), "--lr", "0.1")
    assert code == 1 and "only --epochs can change, not --lr" in err
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "elsewhere"))
    assert code == 1 and "checkpoint not found" in err


def test_the_console_script_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cifar10.cli", "train", "cnn-baseline", "--data-dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "missing CIFAR-10 file" in result.stderr


def test_ctrl_c_in_a_command_that_keeps_nothing_is_one_line_and_status_130(tiny_cifar, tmp_path, capsys, monkeypatch):
    import training.report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.report, "dataset_facts", interrupted)
    code, out, err = run(capsys, "data", "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "facts"))
    assert code == 130 and err.strip() == "cifar10 data: interrupted"


def test_a_run_refused_before_its_first_checkpoint_leaves_no_folder(tiny_cifar, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "train", "fast", "--data-dir", str(tiny_cifar), "--holdout", "500", "--runs-dir", str(tmp_path / "runs"))
    assert code == 1 and "--holdout must lie in" in err
    assert not any((tmp_path / "runs").glob("*"))
    import training.train

    def refused(*args, **kwargs):  # as a VGG run without its ImageNet weights is, once its folder exists
        raise UserError("no weights")

    monkeypatch.setattr(training.train, "train", refused)
    code, _, err = run(capsys, "train", "cnn-baseline", "--data-dir", str(tiny_cifar), "--runs-dir", str(tmp_path / "runs"))
    assert code == 1 and "no weights" in err
    assert not any((tmp_path / "runs").glob("*"))


def test_a_fast_run_too_short_for_its_learning_rate_is_warned_of(tiny_cifar, tmp_path, capsys):
    argv = ["train", "cnn-fast", "--data-dir", str(tiny_cifar), "--epochs", "1", "--batch-size", "32", "--holdout", "0", "--runs-dir", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert "warning: this run reaches the recipe's peak learning rate at step 1," in err  # 100 images in batches of 32: 3 steps


def test_debug_goes_before_or_after_the_command():
    from cifar10.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--debug", "recipes"]).debug and parser.parse_args(["recipes", "--debug"]).debug
    assert not parser.parse_args(["recipes"]).debug


def test_commands_that_need_no_training_run_on_a_serving_install(tmp_path):
    """Without the train extra (PyTorch, tqdm, matplotlib), `cifar10 recipes` works and the others name the extra."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'torchvision', 'tqdm', 'matplotlib'):\n    sys.modules[name] = None\n"
    )
    env = {"PYTHONPATH": str(blocked), "PATH": "/usr/bin:/bin"}
    recipes = subprocess.run([sys.executable, "-m", "cifar10.cli", "recipes"], capture_output=True, text=True, env=env)
    assert recipes.returncode == 0 and "cnn-fast" in recipes.stdout, recipes.stderr
    training = subprocess.run([sys.executable, "-m", "cifar10.cli", "train", "fast"], capture_output=True, text=True, env=env)
    assert training.returncode == 1 and "needs the train extra" in training.stderr, training.stderr


def test_resume_refuses_a_finished_run_but_not_one_trained_on_and_cut_short(tiny_cifar, tmp_path, capsys):
    from training.loop import load_checkpoint, save_checkpoint

    common = ["--data-dir", str(tiny_cifar)]
    assert run(capsys, "train", "cnn-baseline", "--epochs", "1", "--runs-dir", str(tmp_path / "runs"), *common)[0] == 0
    (done,) = (tmp_path / "runs").iterdir()
    code, _, err = run(capsys, "train", "--resume", str(done), *common)
    assert code == 1 and "has finished (its results are in run.json)" in err
    state = load_checkpoint(done)  # as `--resume RUN --epochs 2` leaves it when Ctrl-C cuts its second epoch: run.json is the 1-epoch run's
    state["recipe"]["epochs"] = 2
    save_checkpoint(done, state)
    code, _, err = run(capsys, "train", "--resume", str(done), *common)
    assert code == 0, err
    assert json.loads((done / "run.json").read_text())["recipe"]["epochs"] == 2
