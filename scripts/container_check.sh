#!/usr/bin/env bash
# Build the service's container image from the bento and check that the containerized service
# answers like the bundles offline. No Docker engine needed: Debian's buildah builds and runs the
# image (chroot isolation, vfs storage), and debootstrap makes the Python 3.11 base image, since
# no container registry may be reachable (real users keep BentoML's default base image).
#
#   bash scripts/container_check.sh [DATA_DIR]      # DATA_DIR: CIFAR-10's cifar-10-batches-py
#
# Settings (environment): PYTHON (the project's environment, default .venv/bin/python), BASE_IMAGE
# (default localhost/cifar10-python-base:bookworm, built once and reused), IMAGE (the image to
# build, default localhost/cifar10:check), WORK (a scratch folder, default a new temporary one).
# Prints each step; a failure names its step and exits non-zero. Ends with the image's size and
# build time.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${CIFAR10_DATA_DIR:-data/cifar-10-batches-py}}
PYTHON=${PYTHON:-.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-localhost/cifar10-python-base:bookworm}
IMAGE=${IMAGE:-localhost/cifar10:check}
WORK=${WORK:-$(mktemp -d)}
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
step() { echo; echo "== $*"; }
fail() { echo "container_check: FAILED at: $*" >&2; exit 1; }
[ -f "$DATA/test_batch" ] || fail "no CIFAR-10 test batch in $DATA (pass the cifar-10-batches-py folder)"
[ -x "$PYTHON" ] || fail "no Python at $PYTHON (set PYTHON to the project's environment)"

step "tools: buildah, debootstrap"
missing=""
for tool in buildah debootstrap; do command -v "$tool" > /dev/null || missing="$missing $tool"; done
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] || fail "installing$missing needs root: sudo apt-get install$missing"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } > "$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log"; fail "apt-get install$missing"; }
fi
buildah --version

step "base image $BASE_IMAGE"
if buildah inspect --type image "$BASE_IMAGE" > /dev/null 2>&1; then
  echo "reusing it"
else
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" "${mirror:-http://deb.debian.org/debian}" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap of Debian bookworm (Python 3.11)"; }
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED  # the Dockerfile pip-installs uv system-wide
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"  # this host's TLS roots
  container=$(buildah from scratch)
  cp -a "$WORK/rootfs/." "$(buildah mount "$container")/"
  buildah umount "$container" > /dev/null
  buildah config --env UV_NATIVE_TLS=1 --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$container"
  buildah commit -q "$container" "$BASE_IMAGE" > /dev/null || fail "committing the base image"
  buildah rm "$container" > /dev/null
  rm -rf "$WORK/rootfs"
fi

step "bentoml build (base image overridden for this check only)"
export BENTOML_HOME="$WORK/bentoml"
"$PYTHON" - "$BASE_IMAGE" "$WORK/bentofile.yaml" <<'PY' || fail "writing the check's bentofile"
import sys, yaml
spec = yaml.safe_load(open("bentofile.yaml"))
spec.setdefault("docker", {})["base_image"] = sys.argv[1]
yaml.safe_dump(spec, open(sys.argv[2], "w"))
PY
tag=$("$PYTHON" -m bentoml build -f "$WORK/bentofile.yaml" --output tag . | tail -1) || fail "bentoml build"
tag=${tag#__tag__:}
bento="$BENTOML_HOME/bentos/${tag%%:*}/${tag#*:}"
echo "$tag in $bento"

step "build the image from the bento's Dockerfile"
buildah rmi "$IMAGE" > /dev/null 2>&1 || true  # a previous check's image: vfs keeps every copy whole
started=$(date +%s)
buildah bud --isolation chroot --layers=false -f env/docker/Dockerfile -t "$IMAGE" "$bento" > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "buildah bud (log: $WORK/build.log)"; }
build_seconds=$(( $(date +%s) - started ))
size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
echo "built $IMAGE in ${build_seconds}s: $size, runs as user '$user'"
[ -n "$user" ] && [ "$user" != root ] && [ "$user" != 0 ] || fail "the image runs as root"

step "serve inside the image, check every endpoint against the bundles offline"
port=$("$PYTHON" -c "from bench.harness import free_port; print(free_port())")
container=$(buildah from "$IMAGE")
# the server in its own process group, so that cleanup ends bentoml serve inside the chroot too, not only
# `buildah run`: first the supervisor, which stops its workers (each in a process group of its own), then
# the group, then any worker left without its supervisor
cleanup() {
  if [ -n "${server:-}" ]; then
    pkill -TERM -g "$server" -f "bentoml serve" 2> /dev/null || true
    sleep 2
    kill -- -"$server" 2> /dev/null || true
    pkill -f "_bentoml_impl.worker.service /home/bentoml/bento" 2> /dev/null || true
  fi
  buildah rm "$container" > /dev/null 2>&1 || true
}
trap cleanup EXIT
setsid buildah run --isolation chroot "$container" -- /home/bentoml/bento/env/docker/entrypoint.sh \
  bentoml serve /home/bentoml/bento --host 127.0.0.1 --port "$port" > "$WORK/serve.log" 2>&1 &
server=$!
ready=""
for _ in $(seq 180); do
  if curl -sf "http://127.0.0.1:$port/readyz" > /dev/null; then ready=1; break; fi
  kill -0 "$server" 2> /dev/null || break
  sleep 1
done
[ -n "$ready" ] || { tail -40 "$WORK/serve.log"; fail "the containerized service never became ready"; }
PYTHONPATH=. "$PYTHON" scripts/check_served.py "http://127.0.0.1:$port" --data-dir "$DATA" --models-dir models \
  || { tail -20 "$WORK/serve.log"; fail "the containerized service's answers"; }

step "result"
echo "container_check: OK: $IMAGE ($size) built from $tag in ${build_seconds}s; its service answers as the bundles do"
