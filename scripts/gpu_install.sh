#!/usr/bin/env bash
# Run on the lent GPU machine, over the parts that scripts/gpu_wheels.sh made here and the device calls carried
# there one by one (its printout lists the calls). BUNDLE: ab (onnxruntime-gpu and BentoML's stack).
#
#   bash scripts/gpu_install.sh BUNDLE --status          # between calls: checks the parts here so far
#                                                         # (a lost machine: start again at call 1)
#   bash scripts/gpu_install.sh BUNDLE                   # last call: reassemble, verify, install into $SITE
#   bash scripts/gpu_install.sh BUNDLE -- CMD [ARG...]   # the same, then runs CMD with $SITE first on PYTHONPATH
#
# SITE=/tmp/site, PYTHON=python3. A missing part, or a part or wheel whose size or sha256 differs from
# .whl/BUNDLE/MANIFEST, stops it with rc 1; so does a later part present without an earlier one (--status too:
# the machine was lost between calls, start again). Device packages the wheels rely on are only warned about.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:?usage: gpu_install.sh a|ab [--status | -- CMD ...]}; shift
D=.whl/$B M=.whl/$B/MANIFEST SITE=${SITE:-/tmp/site} PY=${PYTHON:-python3}
die() { echo "gpu_install: FAILED: $*" >&2; exit 1; }
[ "${1:---}" = -- ] || [ "$1" = --status ] || die "unknown argument $1"
[ -f "$M" ] || die "$M is not here: carry it in every call"

missing=() here=0
while read -r kind name size sha; do
  [ "$kind" = part ] || continue
  [ -f "$D/$name" ] || { missing+=("$name"); continue; }
  [ ${#missing[@]} = 0 ] || die "$name is here but not ${missing[*]}: the machine was lost between calls; start again at call 1"
  [ "$(stat -c %s "$D/$name")" = "$size" ] || die "$D/$name: $(stat -c %s "$D/$name") bytes, the manifest says $size"
  [ "$(sha256sum < "$D/$name" | cut -d' ' -f1)" = "$sha" ] || die "$D/$name: sha256 differs from the manifest"
  here=$((here + 1))
done < "$M"
echo "gpu_install: bundle $B: $here part(s) here and verified; ${#missing[@]} to come ${missing[*]}"

"$PY" - "$M" <<'PY'
import importlib.metadata as md, sys
from packaging.specifiers import SpecifierSet
bad = []
for _, name, spec, by in (line.split() for line in open(sys.argv[1]) if line.startswith("have ")):
    try:
        v = md.version(name)
    except md.PackageNotFoundError:
        bad.append(f"{name} is missing ({by} needs {spec})")
        continue
    if spec != "-" and not SpecifierSet(spec).contains(v, prereleases=True):
        bad.append(f"{name} {v} is not {spec} ({by})")
print("gpu_install: the device's own packages the wheels need:", "WARNING\n  " + "\n  ".join(bad) if bad else "all there")
PY
[ "${1:-}" = --status ] && exit 0
[ ${#missing[@]} = 0 ] || die "parts missing: ${missing[*]}"
if [ -n "${OUT:-}" ]; then  # the install's own lines come back as a file: the reply keeps only the output's tail
  exec 3>&1 4>&2 > >(tee "$OUT/install.log") 2>&1
  TEE=$!
fi

T=$(mktemp -d) && trap 'rm -rf "$T"' EXIT
while read -r kind name _; do if [ "$kind" = part ]; then cat "$D/$name"; fi; done < "$M" | tar -x -C "$T" || die "reassembling the parts"
awk '$1 == "wheel" {print $4 "  " $2}' "$M" | (cd "$T" && sha256sum --quiet -c -) || die "a wheel's sha256 differs from $M"
mapfile -t WHEELS < <(awk -v t="$T" '$1 == "wheel" {print t "/" $2}' "$M")
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$SITE" "${WHEELS[@]}" || die "pip install"
rm -rf "$T" && trap - EXIT
# CUDA 13 and cuDNN 9 come with the device's PyTorch, as pip's nvidia-* packages beside it. onnxruntime's
# preload_dlls() looks for them in nvidia/ beside its own package, and the loader in LD_LIBRARY_PATH
# (BentoML's workers inherit both).
NV=$("$PY" -c 'import importlib.util as u, pathlib; s = u.find_spec("torch"); print(pathlib.Path(s.origin).parents[1] / "nvidia" if s else "")')
if [ -d "$NV" ]; then
  ln -sfn "$NV" "$SITE/nvidia"
  export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  echo "gpu_install: WARNING: no nvidia/ beside this Python's torch: onnxruntime will not find CUDA and cuDNN"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
"$PY" - "$SITE" <<'PY' || die "the installed wheels do not import"
import ctypes, sys
import onnxruntime as ort
print("gpu_install: onnxruntime", ort.__version__, "from", ort.__file__, ort.get_available_providers())
assert ort.__file__.startswith(sys.argv[1]), "the device's CPU onnxruntime comes first"
import pydantic  # the bundles' manifests need it: without it nothing below runs
print("gpu_install: pydantic", pydantic.VERSION)
try:  # only the served half needs BentoML; gpu_check.sh runs the in-process half without it
    import bentoml
    print("gpu_install: bentoml", bentoml.__version__)
except Exception as exc:
    print(f"gpu_install: WARNING: bentoml does not import ({type(exc).__name__}: {exc}): the served half will be skipped")
ort.preload_dlls()
for library in ("libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9"):
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        print(f"gpu_install: WARNING: {library} does not load ({exc}): the CUDA provider will fall back to the CPU")
PY
echo "gpu_install: installed ${#WHEELS[@]} wheel(s) into $SITE; in this same command, use them with"
echo "  export PYTHONPATH=$PYTHONPATH PATH=$SITE/bin:\$PATH LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
if [ -n "${OUT:-}" ]; then exec 1>&3 2>&4 3>&- 4>&-; wait "$TEE" 2> /dev/null || true; fi  # the command's output is its own
[ "${1:-}" = -- ] || exit 0
shift
exec "$@"
