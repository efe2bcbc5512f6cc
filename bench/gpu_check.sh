#!/usr/bin/env bash
# The whole path on CUDA in under five minutes, with the project's own commands:
#
#     bash bench/gpu_check.sh          # from the repo root; data and weights from ../shared unless set
#
# 1. prune: 2 phases x 1 epoch on 10,000 training images, --device cuda (bf16 autocast: --amp, the
#    default; crop/flip/RandAugment run on whole batches on the GPU inside compress.data.BatchLoader);
# 2. ptq --run of that model: calibration and the float evaluation on the GPU, the int8 models built
#    and evaluated on the CPU (the x86 engine; int8 kernels are CPU-only);
# 3. tune prune: 4 trials at once with --gpus-per-trial 0.25, so they share the one GPU (Ray gives
#    each a quarter: all four see GPU 0), lr searched, FIFO so every trial runs its 2 epochs;
# then images/s per trial (the epochs table) and GPU utilisation and memory per step, sampled every
# second by `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 1` in the background.
#
# Where there is no GPU (no nvidia-smi, or torch sees no CUDA device) it prints one line and exits 0.
# A fresh machine: .venv is made with `python3 -m venv .venv && .venv/bin/pip install -q -e .` when
# absent. Results and logs go to $GPU_CHECK_DIR (default bench-work/gpu-check), and to $OUT too when
# that is set. Exit 1 when a step fails (its log's tail is printed) or the whole takes over 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

SKIP="no GPU: skipped (nvidia-smi/torch.cuda not available)"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "$SKIP"
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    echo "== installing into .venv (python3 -m venv .venv && .venv/bin/pip install -q -e .)"
    python3 -m venv .venv && .venv/bin/pip install -q -e .
fi
PY=.venv/bin/python
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "$SKIP"
    exit 0
fi

SHARED="$(cd .. && pwd)/shared"
export COMPRESS_DATA="${COMPRESS_DATA:-$SHARED/data}"
export COMPRESS_WEIGHTS="${COMPRESS_WEIGHTS:-$SHARED/weights/resnet20-12fca82f.th}"
WORK="${GPU_CHECK_DIR:-bench-work/gpu-check}"
RESULTS="$WORK/results"
rm -rf "$WORK"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 1 > "$WORK/gpu.csv" &
SMI=$!
trap 'kill "$SMI" 2>/dev/null || true' EXIT
: > "$WORK/steps.txt"  # step name, first and last sample line of gpu.csv, seconds

START=$SECONDS
step() {  # step NAME LIMIT_S COMMAND...: run it, its output in $WORK/NAME.log; on failure its tail, exit 1
    local name=$1 limit=$2 t0=$SECONDS first last
    shift 2
    first=$(wc -l < "$WORK/gpu.csv")
    echo "== $name: $*"
    if ! timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; then
        echo "FAILED: $name (exit status above 0 or over ${limit} s); the end of $WORK/$name.log:"
        tail -n 25 "$WORK/$name.log"
        exit 1
    fi
    last=$(wc -l < "$WORK/gpu.csv")
    echo "$name $first $last $((SECONDS - t0))" >> "$WORK/steps.txt"
    echo "   $name: $((SECONDS - t0)) s"
}

step prune 120 "$PY" -m jobs.launch prune --device cuda --amp --results "$RESULTS" --run-id gpu-prune \
    --phases 2 --epochs 1 --final-sparsity 0.5 --train-size 10000 --batch-size 256
step ptq 90 "$PY" -m jobs.launch ptq --run gpu-prune --device cuda --results "$RESULTS" --run-id gpu-ptq \
    --methods fx,manual --calib-sizes 1000
step tune 150 "$PY" -m jobs.launch tune prune --device cuda --gpus-per-trial 0.25 --max-concurrent 4 \
    --num-samples 4 --scheduler fifo --space lr=loguniform:3e-4:3e-3 --phases 1 --epochs 2 \
    --final-sparsity 0.5 --train-size 10000 --batch-size 256 --results "$RESULTS" --search-id gpu-tune
TOTAL=$((SECONDS - START))
sleep 1
kill "$SMI" 2>/dev/null || true

"$PY" - "$WORK" "$RESULTS" <<'EOF' | tee "$WORK/summary.txt"
"""The figures: GPU use per step, images/s of the prune run and of each trial, the PTQ rows."""
import sys
from pathlib import Path

from compress.results import read_table

work, results = Path(sys.argv[1]), sys.argv[2]
samples = []  # (utilisation %, memory MiB) per second; the header and any unreadable line skipped
for line in (work / "gpu.csv").read_text().splitlines():
    try:
        util, mem = (int(v.strip().split()[0]) for v in line.split(","))
    except (ValueError, IndexError):
        samples.append(None)
        continue
    samples.append((util, mem))
print("\nstep     seconds  GPU util mean/max (%)  memory max (MiB)")
for line in (work / "steps.txt").read_text().splitlines():
    name, first, last, seconds = line.split()
    got = [s for s in samples[int(first):int(last)] if s]
    util = f"{sum(u for u, _ in got) / len(got):.0f} / {max(u for u, _ in got)}" if got else "-"
    print(f"{name:<8} {seconds:>7}  {util:>21}  {max((m for _, m in got), default=0):>16,}")

epochs = read_table(results, "epochs").to_pandas()
phases = read_table(results, "phases").to_pandas()
run = epochs[epochs["run_id"] == "gpu-prune"]
print(f"\nprune gpu-prune on {phases['device_name'].iloc[0]}: images/s per epoch "
      f"{', '.join(f'{v:,.0f}' for v in run['images_per_second'])}; top-1 by phase "
      f"{', '.join(f'{v:.2f}' for v in phases[phases['run_id'] == 'gpu-prune'].sort_values('phase')['top1'])}")
trials = epochs[epochs["search_id"] == "gpu-tune"]
print(f"tune gpu-tune: {trials['trial_id'].nunique()} trials, 4 at once on 0.25 GPU each")
print("  trial        lr        images/s epoch 1  epoch 2  top-1")
for trial, g in trials.sort_values("epoch").groupby("trial_id"):
    rate = "  ".join(f"{v:>8,.0f}" for v in g["images_per_second"])
    print(f"  {trial:<12} {g['spec_lr'].iloc[0]:.2e}  {rate}  {g['top1'].iloc[-1]:6.2f}")
last = trials.sort_values("epoch").groupby("trial_id")["images_per_second"].last()
print(f"  together (last epochs): {last.sum():,.0f} images/s; the prune run alone: "
      f"{run['images_per_second'].iloc[-1]:,.0f} images/s")
ptq = read_table(results, "ptq").to_pandas()
for r in ptq.itertuples():
    print(f"ptq {r.method:<6} calibration on {r.device_name}: {r.calib_seconds:.1f} s; float {r.float_top1:.2f}% "
          f"-> int8 {r.int8_top1:.2f}% (evaluated on the CPU in {r.eval_seconds:.1f} s)")
EOF

echo "total: ${TOTAL} s for the three steps (limit 300 s)"
if [ -n "${OUT:-}" ]; then
    cp "$WORK"/*.log "$WORK"/gpu.csv "$WORK"/steps.txt "$WORK"/summary.txt "$OUT"/ 2>/dev/null || true
fi
if [ "$TOTAL" -gt 300 ]; then
    echo "SLOW: over 5 minutes"
    exit 1
fi
echo "ok"
