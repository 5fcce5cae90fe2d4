"""Where a served request's CPU time goes: py-spy samples the server while bench.http_load's
clients keep it busy, and the samples are summed by what they were doing.

    pip install -e ".[bench]"     # py-spy
    python -m bench.profile_http --model cnn --concurrency 64            # our service
    python -m bench.profile_http --model cnn --concurrency 32 --naive    # bench/naive_app.py
    python -m bench.profile_http --model cnn --concurrency 32 --minimal  # bench/minimal_app.py
    python -m bench.profile_http --model cnn --images 64 --concurrency 16 --gil   # only the thread holding the GIL

Each sample is charged to the first frame, from the innermost outwards, that belongs to a known
part (onnxruntime, image decoding, multipart parsing, our code, BentoML/HTTP/asyncio...). Printed:
the share of samples per part, and the functions with the most samples of their own. With --gil,
py-spy samples only the thread holding the GIL: where one worker's Python time goes, without the
threads that are waiting to get it back (onnxruntime's own threads then do not show).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.harness import REPO, SERVE, running
from bench.http_load import MINIMAL, NAIVE, forms, load, machine, test_pngs

# innermost frames of a thread that waits rather than works (py-spy's idle detection misses these)
WAITING = ("Condition.wait", "select (selectors.py", "_read_from_self", "sleep", "Event.wait", "Thread.join", "_worker (concurrent")
# (part, substrings of a frame "function (file:line)"), matched innermost frame first
PARTS = [
    ("onnxruntime / PyTorch (the model)", ("onnxruntime", "torch/nn/", "torch/_tensor", "training/models.py")),
    ("image decoding (Pillow)", ("PIL/", "bundle/images.py")),
    ("multipart parsing", ("multipart",)),
    ("pydantic / JSON", ("pydantic", "json/", "orjson", "JSONResponse")),
    ("our service code", ("serving/",)),
    ("BentoML", ("bentoml/", "_bentoml_")),
    ("HTTP server (uvicorn, h11, Starlette)", ("uvicorn", "h11", "httptools", "starlette")),
    ("asyncio / threads", ("asyncio", "anyio", "concurrent/futures", "threading.py", "selectors")),
    ("logging / metrics", ("logging", "opentelemetry", "prometheus")),
]


def charge(stack: list[str]) -> tuple[str, str]:
    """(part, the frame that decided it): the innermost frame that belongs to a known part."""
    for frame in reversed(stack):
        for part, needles in PARTS:
            if any(n in frame for n in needles):
                return part, frame
    return "other Python", stack[-1]


def summarise(raw: Path) -> str:
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    within: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    waiting = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        stack = [f for f in stack_text.split(";") if not f.startswith(("process ", "thread "))]
        if not stack or not count.isdigit():
            continue
        if any(w in stack[-1] for w in WAITING):
            waiting += int(count)
            continue
        part, frame = charge(stack)
        parts[part] += int(count)
        within[part][frame.split(" (")[0]] += int(count)
        leaves[stack[-1]] += int(count)
    total = sum(parts.values()) or 1
    rows = [f"{total:,} busy samples ({waiting:,} more in threads waiting: select, locks, sleeps)", ""]
    rows += ["| part | share of busy samples | its top functions |", "| --- | ---: | --- |"]
    for part, n in parts.most_common():
        top = ", ".join(f"`{f}` {k / total:.1%}" for f, k in within[part].most_common(3))
        rows.append(f"| {part} | {n / total:.1%} | {top} |")
    rows += ["", "| function (innermost frame) | share |", "| --- | ---: |"]
    rows += [f"| `{leaf[:110]}` | {n / total:.1%} |" for leaf, n in leaves.most_common(15)]
    return "\n".join(rows)


def py_spy() -> str:
    """py-spy on PATH, or beside this Python (a virtual environment that is not activated)."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        sys.exit("py-spy not found: pip install -e \".[bench]\" (or pip install py-spy)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundle name (default: the service's default)")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--naive", action="store_true", help="profile bench/naive_app.py instead of our service")
    peer.add_argument("--minimal", action="store_true", help="profile bench/minimal_app.py (Starlette + onnxruntime) instead")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "data/cifar-10-batches-py"))
    args = parser.parse_args()

    from serving.settings import Settings

    settings = Settings.from_env()
    model = args.model or settings.default_model
    command = [p.replace("{workers}", "2") for p in (NAIVE if args.naive else MINIMAL if args.minimal else SERVE)]
    env = dict(BENCH_BUNDLE=str(settings.models_dir / model), CIFAR10_DEFAULT_MODEL=model)
    blobs = test_pngs(Path(args.data_dir), 1000)
    served = "naive baseline" if args.naive else "minimal app" if args.minimal else "our service"
    print(f"machine: {machine()}; {served}, model {model}, "
          f"{args.images} image(s)/request at concurrency {args.concurrency}, {args.seconds:g} s")  # fmt: skip
    (REPO / "logs").mkdir(exist_ok=True)
    with running(command, REPO / "logs" / "profile_http_server.log", env=env) as server, tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(server.process.pid), "--subprocesses", "--format", "raw", "--rate", str(args.rate),
             "--duration", str(int(args.seconds)), "--output", str(raw), *(["--gil"] if args.gil else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        result: list = []
        client = threading.Thread(
            target=lambda: result.append(asyncio.run(load(server.url, forms(server.url, blobs, args.images, model), args.images, args.concurrency, args.seconds)))
        )
        client.start()
        _, errors = spy.communicate()
        client.join()
        if spy.returncode != 0 or not raw.exists():
            sys.exit(f"py-spy failed: {errors.strip()[-500:]}")
        from bench.http_load import HEADER

        print("\n".join(HEADER))
        print(result[0].row())
        print()
        print(summarise(raw))


if __name__ == "__main__":
    main()
