#!/usr/bin/env bash
# Choose between settings of a recipe on held-out training images, then train the chosen one
# over several seeds. The test set plays no part in the choice: the candidate runs train without
# the last HOLDOUT training images and are compared on those alone.
#
#   bash scripts/choose_on_holdout.sh RECIPE SEEDS "CANDIDATE" ["CANDIDATE"...] [-- OPTIONS]
#   bash scripts/choose_on_holdout.sh vgg16-fast 3 "--epochs 15" "--epochs 30" -- --device cuda
#
# Each CANDIDATE is a set of `cifar10 train` overrides; OPTIONS go to every run.
# Settings (environment): HOLDOUT (5000 images), RUNS (runs/choose-RECIPE), PARALLEL (1: one
# run at a time, right for a CPU; on a GPU several runs share the card better than one),
# CIFAR10 (the command, default `cifar10`), METRIC (what is compared, from each run.json's
# `final`: held_out_uploads.mean, the held-out accuracy averaged over the upload conditions of
# training/robustness.py, by default; held_out.accuracy for the clean images alone).
# Prints each candidate's held-out accuracy, the choice, and `cifar10 runs` over the seeds.
set -euo pipefail
usage='usage: choose_on_holdout.sh RECIPE SEEDS "CANDIDATE"... [-- OPTIONS]'
RECIPE=${1:?$usage}
SEEDS=${2:?$usage}
shift 2
CANDIDATES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do CANDIDATES+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ "${#CANDIDATES[@]}" -ge 1 ] || { echo "$usage" >&2; exit 2; }
HOLDOUT=${HOLDOUT:-5000}
RUNS=${RUNS:-runs/choose-$RECIPE}
PARALLEL=${PARALLEL:-1}
CIFAR10=${CIFAR10:-cifar10}
METRIC=${METRIC:-held_out_uploads.mean}
mkdir -p "$RUNS"

# Runs the commands read from stdin (one per line), PARALLEL at a time; a failure fails the script.
run_all() {
  local pids=() cmd
  while IFS= read -r cmd; do
    bash -c "$cmd" & pids+=($!)
    if [ "${#pids[@]}" -ge "$PARALLEL" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

echo "== $RECIPE: held-out accuracy of each candidate ($HOLDOUT training images held out)"
for i in "${!CANDIDATES[@]}"; do
  echo "$CIFAR10 train $RECIPE ${CANDIDATES[$i]} --holdout $HOLDOUT --runs-dir $RUNS/candidate-$i $* > $RUNS/candidate-$i.log 2>&1"
done | run_all
best=$(python3 - "$RUNS" "$METRIC" "${CANDIDATES[@]}" <<'PY'
import functools, json, pathlib, sys
root, metric, candidates = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
scores = []
for i, candidate in enumerate(candidates):
    (run,) = (root / f"candidate-{i}").glob("*/run.json")
    final = json.loads(run.read_text())["final"]
    accuracy = functools.reduce(lambda d, key: d[key], metric.split("."), final)
    scores.append(accuracy)
    clean = final["held_out"]["accuracy"]
    print(f"  {candidate}: {metric} {accuracy:.4f} (clean held-out accuracy {clean:.4f})", file=sys.stderr)
print(max(range(len(candidates)), key=scores.__getitem__))
PY
)
CHOSEN=${CANDIDATES[$best]}
echo "  chosen: $CHOSEN"

echo "== $RECIPE $CHOSEN: seeds 0..$((SEEDS - 1)), training on all but the recipe's calibration images"
for s in $(seq 0 $((SEEDS - 1))); do
  echo "$CIFAR10 train $RECIPE $CHOSEN --seed $s --runs-dir $RUNS/seeds $* > $RUNS/seed-$s.log 2>&1"
done | run_all
$CIFAR10 runs --runs-dir "$RUNS/seeds"
