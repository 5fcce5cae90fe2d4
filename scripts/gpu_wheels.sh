#!/usr/bin/env bash
# Prepare, on this machine, the wheels the lent GPU machine lacks (no network there), cut into parts
# that travel one per device call (issue 21). Run here, in the checkout:
#
#   bash scripts/gpu_wheels.sh
#
# Settings: DATA=../shared/data/cifar-10-batches-py (CIFAR-10, for the test images gpu_check.sh uses there);
# MARGIN_MIB=2 (room left free in each call); KINDS=/work/.library/device/KINDS.md (the device's package
# list, "Python packages already there", and the versions its 'pip list' row gives); CARRY_TOO="typing-extensions
# certifi h11 httpcore anyio click rich attrs jinja2" (device packages to carry anyway: their versions there are
# unknown, and a too-old one would only show as a warning on the device, where nothing can be fetched: pydantic 2.14
# wants typing-extensions>=4.16, bentoml 1.4.40 certifi>=2026.10.19, httpcore h11>=0.16; all pure Python, under
# 1 MB together, and backward compatible; CARRY_TOO= carries none).
#
# It downloads cp312 manylinux/py3 wheels into .whl/wheels/ (ignored through .git/info/exclude):
#   a: onnxruntime-gpu;
#   b: bentoml at pyproject.toml's pin and our serving dependencies (pydantic is one that even the in-process
#      check needs), with every dependency found by walking each wheel's METADATA Requires-Dist (markers evaluated
#      for Linux, CPython 3.12), minus what the device already has.
#      pip's resolver (a dry run) picks the versions, one per package, so that they agree with one another.
# It packs them, the bundle ab, as one tar cut into .whl/ab/part.NN, sized so the tree that
# travels (tracked and untracked-not-ignored files) plus one part fits a call's 64 MiB; .whl/<bundle>/MANIFEST holds
# sizes and sha256 of parts and wheels and the device packages relied on. It ends by printing the calls, in order.
# On the device, scripts/gpu_install.sh checks each call's arrival, then reassembles, verifies and installs.
# Relies on (.library/device/README.md): ignored paths carried earlier stay on the machine while it is warm, and a
# carry entry replaces only that path; the machine goes back 30 s after a call, so make the calls back to back.
# Never name .whl or .whl/<bundle> itself in carry (all of it would travel), and leave .whl alone during a
# sequence (a carried path missing here is deleted there). Rerun this when the tree grows.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=$((1024 * 1024)); BUDGET=$((64 * MIB)); MARGIN_MIB=${MARGIN_MIB:-2}
DATA=${DATA:-../shared/data/cifar-10-batches-py}
export KINDS=${KINDS:-/work/.library/device/KINDS.md} CARRY_TOO=${CARRY_TOO-typing-extensions certifi h11 httpcore anyio click rich attrs jinja2} W=.whl
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qxF "/$W/" "$EXCLUDE" 2>/dev/null || echo "/$W/" >> "$EXCLUDE"
git check-ignore -q "$W/x" || { echo "gpu_wheels: $W/ is not ignored by git" >&2; exit 1; }
mkdir -p "$W/wheels"

# 1. Resolve and download: writes $W/set.ab (file names) and $W/have.ab (device packages relied on).
python3 - <<'PY'
import json, os, re, subprocess, sys, tomllib, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

W = os.environ["W"]
TAGS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
MORE = [f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35)]  # the device README: "often 24, 31, 34, 35"
ENV = dict(python_version="3.12", python_full_version="3.12.3", implementation_name="cpython", implementation_version="3.12.3",
           platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine="x86_64")

kinds = open(os.environ["KINDS"]).read()
device = {canon(n.strip()): None for n in kinds.split("## Python packages already there")[1].split("Packages:")[1].strip().rstrip(".").split(",")}
for item in re.search(r"asked for: ([^|]*)", kinds).group(1).split(","):  # the 'pip list' row: the versions known
    name, version = item.split()
    device[canon(name)] = version
ROOTS = ["onnxruntime-gpu==1.31.1"] + [
    r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if canon(Requirement(r).name) != "onnxruntime"
]
CARRY_TOO = {canon(n) for n in os.environ["CARRY_TOO"].split()}

def pip(*args, tags):
    return subprocess.run([sys.executable, "-m", "pip", *args, "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                           *(f"--platform={t}" for t in tags)], capture_output=True, text=True)

# pip's resolver picks one version of each package (it backtracks, e.g. through the
# opentelemetry releases that pin one another exactly); the walk below decides which of them must travel.
for TAGS in (TAGS, TAGS + MORE):
    out = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", f"{W}/report.json", "--target", f"{W}/dry",
              *ROOTS, tags=TAGS)
    if out.returncode == 0:
        break
else:
    sys.exit(f"gpu_wheels: pip cannot resolve {ROOTS}:\n{out.stderr}")
pins = {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(open(f"{W}/report.json"))["install"]}

def download(name):
    out = pip("download", "--no-deps", "-d", f"{W}/wheels", f"{name}=={pins[name]}", tags=TAGS)
    if out.returncode:
        sys.exit(f"gpu_wheels: no wheel for {name}=={pins[name]}:\n{out.stderr}")
    return os.path.basename(re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", out.stdout)[-1])

def requires(file):
    with zipfile.ZipFile(f"{W}/wheels/{file}") as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return [Requirement(r) for r in Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []]

def applies(req, extras):
    return req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in extras)

chosen, have, extras_of = {}, {}, {}  # what travels: name -> wheel, extras; have: what the device must provide

def need(req, parent):
    name = canon(req.name)
    known = "absent" if name in CARRY_TOO else device.get(name, "absent")
    if known != "absent" and (known is None or req.specifier.contains(known, prereleases=True)):
        have.setdefault(name, set()).add((str(req.specifier) or "-", parent))
        if req.extras:  # the device has the package, maybe not what its extras pull in
            for r in requires(download(name)):
                if applies(r, req.extras) and not applies(r, [""]):
                    need(r, name)
        return
    ex = {""} | set(req.extras)
    if name in chosen and ex <= extras_of[name]:
        return
    if not req.specifier.contains(pins[name], prereleases=True):
        sys.exit(f"gpu_wheels: {parent} needs {req}, pip chose {pins[name]}")
    if name not in chosen:
        chosen[name] = download(name)
    extras_of[name] = extras_of.get(name, set()) | ex
    for r in requires(chosen[name]):
        if applies(r, extras_of[name]):
            need(r, name)

for r in ROOTS:
    need(Requirement(r), "gpu" if r.startswith("onnxruntime-gpu") else "pyproject")
for f in set(os.listdir(f"{W}/wheels")) - set(chosen.values()):  # earlier runs' versions, metadata-only downloads
    os.remove(f"{W}/wheels/{f}")
with open(f"{W}/set.ab", "w") as f:
    f.writelines(chosen[n] + "\n" for n in sorted(chosen))
with open(f"{W}/have.ab", "w") as f:
    f.writelines(sorted({f"have {n} {spec} {by}\n" for n in have for spec, by in have[n]}))
print(f"{'wheel':<72} {'bytes':>11}")
for n in sorted(chosen):
    print(f"{chosen[n]:<72} {os.path.getsize(f'{W}/wheels/{chosen[n]}'):>11,}")
PY

# 2. The tree that travels with every call: tracked plus untracked-not-ignored files.
TREE=$( (git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1)
PART=$((BUDGET - TREE - MARGIN_MIB * MIB))
[ "$PART" -ge "$MIB" ] || { echo "gpu_wheels: the tree ($TREE bytes) leaves no room for a part" >&2; exit 1; }
echo; echo "tree that travels: $TREE bytes; part size: $PART bytes (64 MiB less the tree and a $MARGIN_MIB MiB margin)"

# 3. The test images scripts/gpu_check.sh needs there: CIFAR-10's first 1,000, in its own layout (about 3 MB).
mkdir -p "$W/data"
python3 - "$DATA/test_batch" "$W/data/test_batch" <<'PY'
import pickle, sys
batch = pickle.load(open(sys.argv[1], "rb"), encoding="latin1")
pickle.dump({"data": batch["data"][:1000], "labels": batch["labels"][:1000]}, open(sys.argv[2], "wb"))
PY
DATA_BYTES=$(stat -c %s "$W/data/test_batch")

# 4. Each bundle: one tar, cut into parts; MANIFEST; the calls.
for B in ab; do
  rm -rf "${W:?}/$B" && mkdir "$W/$B"
  mapfile -t FILES < "$W/set.$B"
  tar -cf - -C "$W/wheels" "${FILES[@]}" | split -b "$PART" -d -a 2 - "$W/$B/part."
  {
    echo "# scripts/gpu_wheels.sh, $(date -u +%FT%TZ): bundle $B, part size $PART, tree $TREE bytes"
    for p in "$W/$B"/part.*; do echo "part $(basename "$p") $(stat -c %s "$p") $(sha256sum < "$p" | cut -d' ' -f1)"; done
    for f in "${FILES[@]}"; do echo "wheel $f $(stat -c %s "$W/wheels/$f") $(sha256sum < "$W/wheels/$f" | cut -d' ' -f1)"; done
    cat "$W/have.$B"
  } > "$W/$B/MANIFEST"
  LAST=$(ls "$W/$B"/part.* | tail -1)
  BESIDE=$(($(stat -c %s "$LAST") + DATA_BYTES <= PART))  # 1: the test images travel beside the last part
  N=$(($(ls "$W/$B"/part.* | wc -l) + 1 - BESIDE))
  echo; echo "== bundle $B: ${#FILES[@]} wheels, $(du -cb "${FILES[@]/#/$W/wheels/}" | tail -1 | cut -f1) bytes, $N calls, back to back (under 30 s apart)"
  i=0
  [ "$BESIDE" = 1 ] || { i=1 && echo "call 1/$N: carry [\"$W/data\"]  command: ls -l $W/data"; }
  for p in "$W/$B"/part.*; do
    i=$((i + 1))
    CARRY="\"$W/$B/MANIFEST\", \"$p\"" CMD="bash scripts/gpu_install.sh $B --status"
    if [ "$p" = "$LAST" ]; then
      CMD="bash scripts/gpu_install.sh $B -- bash scripts/gpu_check.sh $W/data"
      [ "$BESIDE" = 0 ] || CARRY="$CARRY, \"$W/data\""
    fi
    echo "call $i/$N: carry [$CARRY]  command: $CMD"
  done
done
