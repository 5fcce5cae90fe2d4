"""Training on a few thousand real CIFAR-10 images: loss goes down, resume and Ctrl-C lose nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar10.errors import UserError
from tests.conftest import cpu_bf16
from training.loop import load_checkpoint, pick_device
from training.recipes import check, get_recipe, lr_at, resumed
from training.report import runs_table
from training.train import train

CPU = torch.device("cpu")


def test_training_lowers_the_loss(cifar, tmp_path):
    recipe = get_recipe("cnn-baseline", epochs=3, limit=512)
    run_dir = tmp_path / "runs" / "first"
    run_dir.mkdir(parents=True)
    train(recipe, cifar, run_dir, CPU, bf16=cpu_bf16(), progress=False)
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}
    table = runs_table(tmp_path / "runs")
    assert "| first | cnn-baseline (first 512) | 0 | 3 |" in table
    kept = tmp_path / "runs" / "kept"  # a run folder copied back with its run.json only (as from a GPU machine)
    kept.mkdir()
    shutil.copy(run_dir / "run.json", kept / "run.json")
    (row,) = [line for line in runs_table(tmp_path / "runs").splitlines() if line.startswith("| kept |")]
    assert row.startswith("| kept | cnn-baseline (first 512) | 0 | 3 |") and "| – |" in row  # epochs from the recipe, no median


def test_resume_continues_the_same_history(cifar, tmp_path):
    recipe = get_recipe("cnn-augment", epochs=2, limit=640)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = train(recipe, cifar, tmp_path / "a", CPU, bf16=cpu_bf16(), progress=False)
    train(dict(recipe, epochs=1), cifar, tmp_path / "b", CPU, bf16=cpu_bf16(), progress=False)
    checkpoint = load_checkpoint(tmp_path / "b")
    assert checkpoint["position"]["epoch"] == 1
    resumed = train(recipe, cifar, tmp_path / "b", CPU, bf16=cpu_bf16(), resume=checkpoint, progress=False)
    a = json.loads((tmp_path / "a" / "history.json").read_text())
    b = json.loads((tmp_path / "b" / "history.json").read_text())
    assert without_seconds(a) == without_seconds(b)
    assert resumed["final"] == straight["final"]


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def epochs_done(runs: Path) -> int:
    """Rows in the run's history.json: epochs finished and checkpointed."""
    histories = list(runs.glob("*/history.json"))
    try:
        return len(json.loads(histories[0].read_text())) if histories else 0
    except json.JSONDecodeError:  # caught while being written
        return 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifar10.cli", *args]


@pytest.mark.parametrize(
    ("recipe", "options", "interrupted_in"),
    [
        ("cnn-baseline", ["--limit", "3000", "--epochs", "2"], 2),
        # the fast loop's schedule spans the whole run; its lookahead works from the 4th epoch on, so the 5th is cut
        ("fast", ["--limit", "1024", "--batch-size", "128", "--epochs", "5"], 5),
    ],
)
def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_run(shared_data, tmp_path, recipe, options, interrupted_in):
    common = ["--data-dir", str(shared_data), *options]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    interrupted = subprocess.Popen(_cli("train", recipe, *common, "--runs-dir", str(tmp_path / "x")), env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while epochs_done(tmp_path / "x") < interrupted_in - 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the epochs before are done: now interrupt this one
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err
    assert "resume with: cifar10 train --resume" in err and "Traceback" not in err
    (run,) = (tmp_path / "x").iterdir()
    state = load_checkpoint(run)
    assert state["position"]["epoch"] == interrupted_in - 1  # saved inside the epoch it was cut in
    assert recipe != "fast" or state["lookahead"] is not None  # with the lookahead's average in play
    resumed = subprocess.run(_cli("train", "--resume", str(run), "--data-dir", str(shared_data)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    again = subprocess.run(_cli("train", "--resume", str(run), "--data-dir", str(shared_data)), capture_output=True, text=True)
    assert again.returncode == 1 and "has finished (its results are in run.json): nothing to resume" in again.stderr
    unbroken = subprocess.run(_cli("train", recipe, *common, "--runs-dir", str(tmp_path / "y")), capture_output=True, text=True)
    assert unbroken.returncode == 0, unbroken.stderr
    (reference,) = (tmp_path / "y").iterdir()
    history = json.loads((run / "history.json").read_text())
    assert len(history) == int(options[-1])
    assert without_seconds(history) == without_seconds(json.loads((reference / "history.json").read_text()))


def test_frozen_vgg_blocks_stay_put_while_the_head_learns(cifar, tmp_path):
    from torchvision.models import vgg16

    weights = tmp_path / "vgg16.pt"
    torch.save(vgg16(weights=None).features.state_dict(), weights)
    recipe = get_recipe("vgg16-3block", weights=str(weights), freeze=True, epochs=1, limit=128)
    (tmp_path / "run").mkdir()
    train(recipe, cifar, tmp_path / "run", CPU, bf16=cpu_bf16(), progress=False)
    checkpoint = load_checkpoint(tmp_path / "run")
    saved = torch.load(weights)
    assert torch.equal(checkpoint["model"]["body.0.0.weight"], saved["0.weight"])
    assert torch.equal(checkpoint["model"]["body.0.14.weight"], saved["14.weight"])
    # the optimiser only ever saw the head: Dense 256, BatchNorm and Dense 10, weight and bias each
    moments = [s["exp_avg"] for s in checkpoint["optimizer"]["state"].values()]
    assert len(moments) == 6 and all(m.abs().sum() > 0 for m in moments)


def test_the_schedule_reproduces_the_study_elif_that_never_fires():
    recipe = get_recipe("cnn-schedule")
    assert [lr_at(recipe, e) for e in (0, 50, 51, 76, 99)] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4]


def test_a_misspelt_or_mistyped_recipe_key_fails_before_training_naming_it():
    fast = get_recipe("fast")
    with pytest.raises(UserError, match="recipe fast: unknown key 'epoch'"):
        check(dict(fast, epoch=20))
    with pytest.raises(UserError, match="no 'lookahead'"):
        check({k: v for k, v in fast.items() if k != "lookahead"})
    with pytest.raises(UserError, match="batch_size='64' is not int"):
        check(dict(get_recipe("cnn-baseline"), batch_size="64"))
    with pytest.raises(UserError, match="loop='slow' is not"):
        check(dict(fast, loop="slow"))
    assert resumed({k: v for k, v in get_recipe("cnn-baseline").items() if k != "loop"})["loop"] == "study"  # an older checkpoint's


def test_overrides_and_unknown_recipes():
    assert get_recipe("vgg16-full", epochs=2, lr=0.01)["epochs"] == 2
    with pytest.raises(UserError, match="cnn-baseline"):
        get_recipe("cnn-nope")
    with pytest.raises(UserError, match="at least 1"):
        get_recipe("cnn-baseline", epochs=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        pick_device("cuda")


def test_a_fine_tuning_run_resumes_without_the_pretrained_file(cifar, tmp_path):
    from torchvision.models import vgg16

    weights = tmp_path / "vgg16.pt"
    torch.save(vgg16(weights=None).features.state_dict(), weights)
    recipe = get_recipe("vgg16-3block", weights=str(weights), epochs=2, limit=64)
    (tmp_path / "run").mkdir()
    train(dict(recipe, epochs=1), cifar, tmp_path / "run", CPU, bf16=cpu_bf16(), progress=False)
    weights.unlink()  # gone, as ImageNet weights are on a machine that resumes elsewhere
    train(recipe, cifar, tmp_path / "run", CPU, bf16=cpu_bf16(), resume=load_checkpoint(tmp_path / "run"), progress=False)
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 2


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    from training.loop import new_run_dir

    folders = {new_run_dir(tmp_path / "runs", "fast") for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() and f.name.startswith("fast-") for f in folders)


def test_ctrl_c_during_the_final_evaluations_says_how_to_resume(cifar, tmp_path, monkeypatch):
    """Every epoch is in the checkpoint by then: the message names the --resume that runs the evaluations alone."""
    import training.train

    real = training.train.evaluate

    def evaluate(*args, progress=None, **kwargs):
        if progress and progress.startswith("final"):
            raise KeyboardInterrupt
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(training.train, "evaluate", evaluate)
    with pytest.raises(UserError, match=f"interrupted; resume with: cifar10 train --resume {tmp_path}"):
        train(get_recipe("cnn-baseline", epochs=1, limit=256), cifar, tmp_path, CPU, bf16=cpu_bf16(), progress=False)
    assert load_checkpoint(tmp_path)["position"]["epoch"] == 1
