#!/usr/bin/env bash
# The CUDA path end to end on a machine with an NVIDIA GPU, on the committed bundles (models/):
#   1. each bundle on onnxruntime's CUDAExecutionProvider, the provider read back from its session, its
#      answers against the CPU's on the same test images (scripts/check_cuda.py);
#   2. in-process throughput by batch size, against PyTorch on the same GPU (bench.model_throughput);
#   3. where BentoML imports, `bentoml serve` with the CUDA provider: /models reports it, every endpoint
#      answers as the bundle does offline within the GPU's tolerance (scripts/check_served.py), and
#      HTTP load at 1, 32 and 64 clients (bench.http_load);
#   4. with TRAIN=1 first, the fast recipe trained on the GPU and exported (the whole data set needed).
#
#   bash scripts/gpu_check.sh DATA_DIR [REPORT_DIR]
#
# A failing check is noted and the next one runs (a lent machine gives one try); the script ends with
# every failure named and exit status 1, or "gpu_check: OK". DATA_DIR holds CIFAR-10's test_batch (scripts/gpu_wheels.sh makes a 1,000-image one in .whl/data;
# TRAIN=1 needs the whole cifar-10-batches-py folder). REPORT_DIR (default: $OUT where set, else
# gpu-check/) gets the log and the figures. onnxruntime-gpu (never beside onnxruntime: both are the
# module `onnxruntime`), BentoML's stack and PyTorch must import: INSTALL=1 first makes a virtual
# environment with them from PyPI. On the lent machine, which has no network, the last device call of
# scripts/gpu_wheels.sh's sequence runs it (docs/deployment.md):
#   bash scripts/gpu_install.sh ab -- bash scripts/gpu_check.sh .whl/data
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: gpu_check.sh DATA_DIR [REPORT_DIR]}
REPORT=${2:-${OUT:-gpu-check}}
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$REPORT"
exec > >(tee "$REPORT/gpu_check.log") 2>&1
TEE=$!
SERVER=""
finish() {  # the server's whole process group, then tee's last lines: a killed tee loses the end of the log
  [ -n "$SERVER" ] && kill -- -"$SERVER" 2> /dev/null
  exec >&- 2>&-
  wait "$TEE" 2> /dev/null || true
}
trap finish EXIT
FAILED=()
step() { echo; echo "== $*"; }
fail() { echo "gpu_check: FAILED at: $*" >&2; exit 1; }
check() {  # check NAME SECONDS CMD...: runs it, and on failure notes it and goes on (a lent machine gives one try)
  local name=$1 seconds=$2 && shift 2
  timeout "$seconds" "$@" || { echo "gpu_check: FAILED: $name" >&2; FAILED+=("$name"); }
}
export BENTOML_DO_NOT_TRACK=true

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || fail "nvidia-smi (no NVIDIA driver?)"
if [ "${INSTALL:-0}" = 1 ]; then
  step "install into a fresh virtual environment"
  WORK=$(mktemp -d) && "$PY" -m venv "$WORK/venv" && . "$WORK/venv/bin/activate" && PY=python
  pip install -q -e ".[train]" && pip uninstall -q -y onnxruntime && pip install -q onnxruntime-gpu || fail "pip install"
fi
"$PY" - <<'PY' || fail "CUDA is not visible to PyTorch or onnxruntime"
import onnxruntime, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "->", torch.cuda.get_device_name(0))
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
assert torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
PY

MODELS=models
if [ "${TRAIN:-0}" = 1 ]; then
  step "train the fast recipe on the GPU (${EPOCHS:-10} epochs) and export it beside the committed bundles"
  MODELS=$(mktemp -d) RUNS=$(mktemp -d) && cp -r models/* "$MODELS"
  "$PY" -m cifar10 train fast --device cuda --epochs "${EPOCHS:-10}" --data-dir "$DATA" --runs-dir "$RUNS" || fail "training on cuda"
  "$PY" -m cifar10 export "$(ls -d "$RUNS"/fast-* | tail -1)" --name gpu-fast --models-dir "$MODELS" --data-dir "$DATA" || fail "export"
fi

step "each bundle on CUDAExecutionProvider against the CPU"
check "the bundles on CUDA against the CPU" 120 "$PY" scripts/check_cuda.py --data-dir "$DATA" --models-dir "$MODELS" --report "$REPORT/parity.json"

step "each bundle in process on the GPU: onnxruntime's CUDA provider against PyTorch eager, by batch size"
for bundle in "$MODELS"/*/manifest.json; do
  check "bench.model_throughput $(dirname "$bundle")" 90 "$PY" -m bench.model_throughput --bundle "$(dirname "$bundle")" --device cuda --seconds 0.5 --rounds 1
done

if ! "$PY" -c "import bentoml" 2> /dev/null; then
  echo; echo "gpu_check: BentoML does not import here, so the served half was not run"
  FAILED+=("serving (no BentoML)")
else
  step "serve with CUDAExecutionProvider"
  export CIFAR10_MODELS_DIR="$MODELS" BENTOML_HOME="$(mktemp -d)"
  export CIFAR10_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider CIFAR10_MAX_BATCH_SIZE=256  # as bentofile.gpu.yaml
  # in its own process group, its log straight into the report without the access log's line per
  # request (too long to bring back whole), so that a run cut short still brings it back
  setsid bash -c '"$0" -m bentoml serve serving.service:CIFAR10 --port 3300 2>&1 | grep --line-buffered -v "(scheme=http" > "$1"' \
    "$PY" "$REPORT/serve.log" &
  SERVER=$!
  if "$PY" - "$SERVER" "$REPORT/models.json" <<'PY'; then
import json, os, sys, time
import httpx
server, end = int(sys.argv[1]), time.monotonic() + 90
while time.monotonic() < end:
    os.kill(server, 0)  # raises once the server has died
    try:
        if httpx.get("http://127.0.0.1:3300/readyz", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(1)
else:
    sys.exit("the service was not ready within 90 s")
models = httpx.post("http://127.0.0.1:3300/models", json={}, timeout=30).raise_for_status().json()
open(sys.argv[2], "w").write(json.dumps(models, indent=2))
print("\n".join(f"{m['name']}: {m['provider']}" for m in models))
sys.exit(0 if all(m["provider"] == "CUDAExecutionProvider" for m in models) else "a served model runs on the CPU")
PY
    check "the served answers against the bundles offline" 60 \
      "$PY" scripts/check_served.py http://127.0.0.1:3300 --data-dir "$DATA" --models-dir "$MODELS" --tolerance 1e-2
    step "HTTP load against the GPU-served default bundle"
    check "bench.http_load" 60 "$PY" -m bench.http_load --url http://127.0.0.1:3300 --data-dir "$DATA" --concurrency 1 32 64 --images 1 64 --seconds 3
  else
    FAILED+=("serving with CUDA")
    tail -30 "$REPORT/serve.log"
  fi
fi

echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${#FAILED[@]} check(s): $(IFS=';' && echo "${FAILED[*]}")" >&2
  exit 1
fi
echo "gpu_check: OK"
