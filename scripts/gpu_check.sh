#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU and CuPy (e.g. pip install -e ".[cuda12]").
#   1. the whole test suite (device-parametrised tests run on cuda there, CPU<->GPU parity),
#   2. a default 10-epoch training run on cuda (accuracy per epoch, time to 99 %),
#   3. the benchmark at batch 128 and 1024 with PyTorch side by side (if installed),
# and prints one summary table. Usage: LENET_XP_DATA=/path/to/mnist bash scripts/gpu_check.sh
# (DEVICE=cpu runs the same steps on the CPU: a dry run of this script where there is no GPU.)
# Needs numpy, cupy, pytest, tqdm, threadpoolctl (and torch for the side-by-side); it runs from
# the source tree (PYTHONPATH), nothing is installed. On a machine that cannot download MNIST,
# copy the four .gz files into the git-ignored .data/ first (e.g. with the device tool:
# `mkdir -p .data && cp ../shared/datasets/mnist/*.gz .data/`, carry .data, LENET_XP_DATA=.data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LENET_XP_DATA=${LENET_XP_DATA:-$PWD/../shared/datasets/mnist}
DEVICE=${DEVICE:-cuda}

[ "$DEVICE" = cpu ] || $PY - <<'PYEOF'
import sys
from lenet_xp.backend import cuda_unavailable_reason
reason = cuda_unavailable_reason()
if reason:
    sys.exit(f"gpu_check: no usable GPU: {reason}")
import cupy
props = cupy.cuda.runtime.getDeviceProperties(0)
print(f"gpu_check: {props['name'].decode()}, CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
PYEOF

echo "== 1. test suite"
set +e
$PY -m pytest -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -n 25
tests_rc=${PIPESTATUS[0]}
set -e

echo "== 2. training, 10 epochs on $DEVICE"
$PY -m lenet_xp.train --device "$DEVICE" --quiet --out "$OUT/run" --metrics "$OUT/gpu.jsonl"

echo "== 2b. determinism: the same short run twice"
for r in a b; do
  $PY -m lenet_xp.train --device "$DEVICE" --quiet --epochs 2 --limit-train 10000 \
    --out "$OUT/det_$r" --metrics "$OUT/det_$r.jsonl"
done

echo "== 3. benchmark"
$PY -m lenet_xp.bench --device "$DEVICE" --batch-sizes 128 1024 --epochs 3 --torch | tee "$OUT/bench.txt"

$PY - "$OUT" "$tests_rc" <<'PYEOF'
import json, re, sys
out, tests_rc = sys.argv[1], int(sys.argv[2])
runs = [json.loads(l) for l in open(f"{out}/gpu.jsonl")]
summary = open(f"{out}/pytest.txt").read().strip().splitlines()[-1]
elapsed, to_99 = 0.0, None
for r in runs:
    elapsed += r["train_seconds"]
    if to_99 is None and r["test_acc"] >= 0.99:
        to_99 = (r["epoch"], elapsed)
def without_timings(path):
    drop = {"train_seconds", "images_per_second"}
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in open(path)]
same = without_timings(f"{out}/det_a.jsonl") == without_timings(f"{out}/det_b.jsonl")
bench = open(f"{out}/bench.txt").read()
rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d,]+)\s+([\d.na]+)\s+([\d.na]+)\s*$", bench, re.M)
print("\n== gpu_check summary")
print(f"{'item':<34} value")
print(f"{'tests':<34} {summary} (exit {tests_rc})")
for r in runs:
    print(f"{'epoch ' + str(r['epoch']) + ' test_acc / seconds':<34} {100 * r['test_acc']:.2f} % / {r['train_seconds']:.2f} s")
print(f"{'same seed, same metrics (2 runs)':<34} {'yes' if same else 'NO: metrics differ'}")
print(f"{'time to 99 % test accuracy':<34} " + (f"{to_99[1]:.1f} s (epoch {to_99[0]})" if to_99 else "not reached"))
for b, s, ips, ref, ratio in rows:
    print(f"{'batch ' + b + ': epoch s, img/s':<34} {s} s, {ips} img/s; torch {ref} s; ours/torch {ratio}")
sys.exit(1 if tests_rc else 0)
PYEOF
