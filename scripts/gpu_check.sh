#!/usr/bin/env bash
# The CUDA paths end to end, in one go, on a machine with an NVIDIA GPU:
#   train on the GPU → export → in-process throughput (bench.model_throughput) → serve with
#   onnxruntime's CUDAExecutionProvider → load it over HTTP (bench.http_load).
#
#   bash scripts/gpu_check.sh [DATA_DIR]        # DATA_DIR: CIFAR-10's cifar-10-batches-py folder
#
# It makes its own virtual environment with onnxruntime-gpu (never next to onnxruntime: both
# provide the module `onnxruntime`). SKIP_INSTALL=1 uses the active environment instead.
# EPOCHS (default 10) sets the training length; the printout ends with the figures to record.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${CIFAR10_DATA_DIR:-data/cifar-10-batches-py}}
WORK=${WORK:-$(mktemp -d)}
EPOCHS=${EPOCHS:-10}
step() { echo; echo "== $*"; }
fail() { echo "gpu_check: FAILED at: $*" >&2; exit 1; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || fail "nvidia-smi (no NVIDIA driver?)"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  step "install into $WORK/venv"
  python3 -m venv "$WORK/venv" && . "$WORK/venv/bin/activate"
  pip install -q -e ".[train]" || fail "pip install"
  pip uninstall -q -y onnxruntime && pip install -q onnxruntime-gpu || fail "installing onnxruntime-gpu"
fi
python - <<'PY' || fail "CUDA is not visible to PyTorch or onnxruntime"
import onnxruntime, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "->", torch.cuda.get_device_name(0))
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
assert torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
PY

step "train the fast recipe on the GPU ($EPOCHS epochs)"
[ -f "$DATA/test_batch" ] || DOWNLOAD=--download
cifar10 train fast --device cuda --epochs "$EPOCHS" --data-dir "$DATA" ${DOWNLOAD:-} --runs-dir "$WORK/runs" || fail "training on cuda"
RUN=$(ls -d "$WORK"/runs/fast-* | tail -1)

step "export $RUN"
cifar10 export "$RUN" --name fast --models-dir "$WORK/models" --data-dir "$DATA" || fail "export"

step "serve with CUDAExecutionProvider"
export CIFAR10_MODELS_DIR="$WORK/models" CIFAR10_DEFAULT_MODEL=fast
export CIFAR10_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider CIFAR10_MAX_BATCH_SIZE=256  # as bentofile.gpu.yaml
python -m bentoml serve serving.service:CIFAR10 --port 3300 > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf localhost:3300/readyz > /dev/null && break; sleep 1; done
curl -sf localhost:3300/readyz > /dev/null || { tail -50 "$WORK/serve.log"; fail "the service never became ready"; }
grep "provider in use" "$WORK/serve.log"
grep -q "provider in use CUDAExecutionProvider" "$WORK/serve.log" || fail "onnxruntime fell back to the CPU"
curl -s -X POST localhost:3300/models -H 'Content-Type: application/json' -d '{}'; echo
PYTHONPATH=. python scripts/check_served.py http://localhost:3300 --data-dir "$DATA" --models-dir "$WORK/models" \
  || fail "the GPU-served answers differ from the bundle's offline ones"

step "the bundle in process on the GPU: onnxruntime's CUDA provider against PyTorch eager, by batch size"
python -m bench.model_throughput --bundle "$WORK/models/fast" --run "$RUN" --seconds 2 --rounds 1 || fail "bench.model_throughput on cuda"

step "HTTP load against the GPU-served bundle"
python -m bench.http_load --url http://localhost:3300 --data-dir "$DATA" --concurrency 1 16 64 --images 1 64 --seconds 10

step "figures to record"
python - "$RUN" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/run.json"))
tta = s["final"]["test_tta"]["flip-translate"]["accuracy"]
print(f"{s['device_name']}: {s['train_seconds']:.1f} s training, test {s['final']['test']['accuracy']:.4f}, with TTA {tta:.4f}")
PY
echo "gpu_check: OK"
