#!/usr/bin/env bash
# The CUDA path end to end on a machine with an NVIDIA GPU, on the committed bundles (models/):
#   1. each bundle on onnxruntime's CUDAExecutionProvider, the provider read back from its session, its
#      answers against the CPU's on the same test images (scripts/check_cuda.py);
#   2. in-process throughput by batch size, against PyTorch on the same GPU (bench.model_throughput);
#   3. where BentoML imports, `bentoml serve` with the CUDA provider: /models reports it, every endpoint
#      answers as the bundle does offline (scripts/check_served.py), and HTTP load at 1, 32 and 64
#      clients (bench.http_load);
#   4. with TRAIN=1 first, the fast recipe trained on the GPU and exported (the whole data set needed).
#
#   bash scripts/gpu_check.sh DATA_DIR [REPORT_DIR]
#
# DATA_DIR holds CIFAR-10's test_batch (scripts/gpu_wheels.sh makes a 1,000-image one in .whl/data;
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
step() { echo; echo "== $*"; }
fail() { echo "gpu_check: FAILED at: $*" >&2; exit 1; }

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
"$PY" scripts/check_cuda.py --data-dir "$DATA" --models-dir "$MODELS" --report "$REPORT/parity.json" || fail "the bundles on CUDA"

step "each bundle in process on the GPU: onnxruntime's CUDA provider against PyTorch eager, by batch size"
for bundle in "$MODELS"/*/manifest.json; do
  "$PY" -m bench.model_throughput --bundle "$(dirname "$bundle")" --device cuda --seconds 2 --rounds 2 || fail "bench.model_throughput on cuda"
done

if ! "$PY" -c "import bentoml" 2> /dev/null; then
  echo; echo "gpu_check: OK in process; BentoML does not import here, so the served half was not run"
  exit 0
fi
step "serve with CUDAExecutionProvider"
export CIFAR10_MODELS_DIR="$MODELS" BENTOML_HOME="$(mktemp -d)"
export CIFAR10_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider CIFAR10_MAX_BATCH_SIZE=256  # as bentofile.gpu.yaml
"$PY" -m bentoml serve serving.service:CIFAR10 --port 3300 > "$REPORT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 180); do curl -sf localhost:3300/readyz > /dev/null && break; sleep 1; done
curl -sf localhost:3300/readyz > /dev/null || { tail -50 "$REPORT/serve.log"; fail "the service never became ready"; }
grep "provider in use" "$REPORT/serve.log"
grep -q "provider in use CUDAExecutionProvider" "$REPORT/serve.log" || fail "onnxruntime fell back to the CPU"
curl -s -X POST localhost:3300/models -H 'Content-Type: application/json' -d '{}' | tee "$REPORT/models.json"; echo
"$PY" scripts/check_served.py http://localhost:3300 --data-dir "$DATA" --models-dir "$MODELS" \
  || fail "the GPU-served answers differ from the bundle's offline ones"

step "HTTP load against the GPU-served default bundle"
"$PY" -m bench.http_load --url http://localhost:3300 --data-dir "$DATA" --concurrency 1 32 64 --images 1 64 --seconds 5
echo "gpu_check: OK"
