#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU and CuPy (e.g. pip install -e ".[cuda12,test]").
#   1. the whole test suite with LENET_XP_REQUIRE_CUDA=1: every "no usable GPU" skip is a
#      failure, so the check cannot pass by skipping (GPU tests: CPU<->GPU parity, every kernel
#      of ours against the array-op reference, graph replay = eager, no hidden sync),
#      and, on a host with two GPUs and the mpi-cuda12 extra, two MPI ranks through NCCL),
#   2. default 10-epoch training runs on cuda with each engine: the array-op layers,
#      --engine kernels (the layers' step with our kernels, eager) and --engine graph (that
#      step captured as one CUDA graph),
#   2b. determinism: the same short run twice per engine,
#   3. the benchmark at batch 128 and 1024 with PyTorch side by side (eager and CUDA graph, if
#      installed), launches per step, and time to 99 % test accuracy,
#   3b. the cost of --recipe best's augmentation and weight averaging (bench --augment --ema),
# and prints one summary table. Usage: LENET_XP_DATA=/path/to/mnist bash scripts/gpu_check.sh
# (DEVICE=cpu runs the same steps on the CPU: a dry run of this script where there is no GPU;
# the kernel engines then train with the layers and say so.)
# Needs numpy, cupy, pytest, tqdm, threadpoolctl (and torch for the side-by-side); it runs from
# the source tree (PYTHONPATH), nothing is installed. On a machine that cannot download MNIST,
# copy the four .gz files into the git-ignored .data/ first (e.g. with the device tool:
# `mkdir -p .data && cp ../shared/datasets/mnist/*.gz .data/`, carry .data, LENET_XP_DATA=.data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LENET_XP_DATA=${LENET_XP_DATA:-$PWD/../shared/datasets/mnist}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-10}
[ "$DEVICE" = cpu ] || export LENET_XP_REQUIRE_CUDA=1

[ "$DEVICE" = cpu ] || $PY - <<'PYEOF'
import sys
from lenet_xp.backend import cuda_unavailable_reason
reason = cuda_unavailable_reason()
if reason:
    sys.exit(f"gpu_check: no usable GPU: {reason}")
import cupy
props = cupy.cuda.runtime.getDeviceProperties(0)
print(f"gpu_check: {props['name'].decode()}, CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}")
PYEOF

echo "== 1. test suite (LENET_XP_REQUIRE_CUDA=${LENET_XP_REQUIRE_CUDA:-0})"
set +e
$PY -m pytest -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -n 25
tests_rc=${PIPESTATUS[0]}
set -e

ENGINES=("layers:--engine layers" "kernels:--engine kernels" "graph:--engine graph")
for spec in "${ENGINES[@]}"; do
  name=${spec%%:*} flag=${spec#*:}
  echo "== 2. training, $EPOCHS epochs on $DEVICE, engine $name ($flag)"
  $PY -m lenet_xp.train --device "$DEVICE" $flag --epochs "$EPOCHS" --quiet --out "$OUT/run_$name" \
    --metrics "$OUT/train_$name.jsonl"
  echo "== 2b. determinism, engine $name: the same short run twice"
  for r in a b; do
    $PY -m lenet_xp.train --device "$DEVICE" $flag --quiet --epochs 2 --limit-train 10000 \
      --out "$OUT/det_${name}_$r" --metrics "$OUT/det_${name}_$r.jsonl"
  done
done

echo "== 3. benchmark"
$PY -m lenet_xp.bench --device "$DEVICE" --batch-sizes 128 1024 --epochs 3 --torch --time-to 0.99 \
  | tee "$OUT/bench.txt"

echo "== 3a. every other preset: our engines at batch 128 and 1024"
for arch in lenet5-nopad lenet5-sigmoid-avg lenet5-classic compact-cnn; do
  $PY -m lenet_xp.bench --device "$DEVICE" --arch "$arch" --batch-sizes 128 1024 --epochs 3 \
    --no-profile | tee "$OUT/bench_$arch.txt"
done

echo "== 3b. augmentation cost (issue budget: 30 % on a GPU): --recipe best's distortions and EMA"
$PY -m lenet_xp.bench --device "$DEVICE" --epochs 5 --no-profile --augment default,elastic=8:3 \
  --ema 0.999 | tee "$OUT/bench_augment.txt"

$PY - "$OUT" "$tests_rc" <<'PYEOF'
import json, re, statistics, sys
out, tests_rc = sys.argv[1], int(sys.argv[2])
summary = open(f"{out}/pytest.txt").read().strip().splitlines()[-1]
def without_timings(path):
    drop = {"train_seconds", "images_per_second"}
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in open(path)]
print("\n== gpu_check summary")
print(f"{'item':<40} value")
print(f"{'tests':<40} {summary} (exit {tests_rc})")
for name in ("layers", "kernels", "graph"):
    runs = [json.loads(l) for l in open(f"{out}/train_{name}.jsonl")]
    elapsed, to_99 = 0.0, None
    for r in runs:
        elapsed += r["train_seconds"]
        if to_99 is None and r["test_acc"] >= 0.99:
            to_99 = (r["epoch"], elapsed)
    median = statistics.median(r["train_seconds"] for r in runs)
    accs = " ".join(f"{100 * r['test_acc']:.2f}" for r in runs)
    print(f"{name + ': engine used':<40} {runs[-1].get('engine')}")
    print(f"{name + ': test_acc per epoch (%)':<40} {accs}")
    print(f"{name + ': median epoch s':<40} {median:.3f}")
    print(f"{name + ': time to 99 % (default run)':<40} " + (f"{to_99[1]:.2f} s (epoch {to_99[0]})" if to_99 else "not reached"))
    same = without_timings(f"{out}/det_{name}_a.jsonl") == without_timings(f"{out}/det_{name}_b.jsonl")
    print(f"{name + ': same seed, same metrics':<40} {'yes' if same else 'NO: metrics differ'}")
bench = open(f"{out}/bench.txt").read()
for line in bench.splitlines():
    if re.match(r"^\s+\d+\s+\S+\s+[\d.]+\s", line) or line.startswith(("not timed", "layers ", "kernels ", "graph ", "torch")):
        print(f"{'bench':<40} {line.strip()}")
for line in open(f"{out}/bench_augment.txt"):
    if line.startswith("augmentation ("):
        print(f"{'augmentation cost':<40} {line.strip()}")
sys.exit(1 if tests_rc else 0)
PYEOF
