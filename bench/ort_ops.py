"""Where a bundle's onnxruntime graph spends its time, by operator type: fp32 against int8.

    python -m bench.ort_ops --bundle models/cnn [--batch 64] [--runs 50]

onnxruntime's own profiler times every node of `--runs` calls at batch `--batch` (random pixels;
the cost does not depend on them), for the bundle's fp32 graph and its int8 variant. Printed: the
milliseconds per call spent in each operator type and their share, so that an int8 graph slower
than its fp32 one shows where the time goes (the QuantizeLinear/DequantizeLinear pairs around
each quantized operator, or the operators themselves).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.http_load import machine
from bundle.runtime import MODEL_FILE, session_options, verify


def op_times(model: Path, batch: int, runs: int) -> dict[str, float]:
    """Milliseconds per call in each operator type, from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(None, spinning=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ops")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)}
        session.run(None, feed)  # warm-up, profiled too: subtracted below by counting from the second call
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    calls = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    counted_from = calls[1]["ts"] if len(calls) > 1 else 0
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= counted_from:
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return dict(per_op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="models/cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    folder = Path(args.bundle)
    manifest, _ = verify(folder)
    graphs = {"fp32": folder / MODEL_FILE}
    graphs |= {v.precision: folder / v.file for v in manifest.variants}
    times = {name: op_times(path, args.batch, args.runs) for name, path in graphs.items()}
    print(f"machine: {machine()}; onnxruntime {ort.__version__}; bundle {manifest.name}; batch {args.batch}, {args.runs} calls")
    ops = sorted({op for t in times.values() for op in t}, key=lambda op: -max(t.get(op, 0) for t in times.values()))
    print("\n| operator | " + " | ".join(f"{name} ms per call | share" for name in times) + " |")
    print("| --- |" + " ---: | ---: |" * len(times))
    for op in ops:
        cells = [f"{t.get(op, 0):.3f} | {t.get(op, 0) / sum(t.values()):.1%}" for t in times.values()]
        print(f"| {op} | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{sum(t.values()):.3f} | 100%" for t in times.values()) + " |")


if __name__ == "__main__":
    main()
