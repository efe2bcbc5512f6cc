#!/usr/bin/env bash
# What breaks on CUDA, with the project's own commands, in about 8 minutes on one H100:
#
#     bash bench/gpu_check.sh              # from anywhere; exit 0 only when every step passed
#     GPU_CHECK_STEPS=resume,tune bash bench/gpu_check.sh     # some steps (and the steps they need)
#
# Steps (each a line in the table at the end, with its seconds, GPU use and images/s):
#   auto          prune --device auto: every row's device_name is the GPU's name, not "cpu"
#   resume        two runs of one spec (--device cuda, torch.compile auto, RandAugment, KD, BN re-estimation):
#                 one uninterrupted, one killed with kill -9 once its progress.json shows phase 2 epoch 1, then
#                 prune --resume; their phase, epoch and module rows (top-1, sparsity, nonzero, losses,
#                 predicted classes) and final.pt must be equal: the differences are printed when not
#   ptq           ptq --run of that model on CUDA, pt2e and manual, histogram observer: rows say the GPU
#                 calibrated, int8 within 3 points of float
#   export        export --select method=pt2e and method=manual, calibrating on CUDA again: the rebuilt model
#                 must score its row (a "warning:" about drift fails the step)
#   verify        verify of the four exported files and of the GPU-trained run's model.float.packed: each is
#                 re-evaluated on the CPU (the float model in float32) and must reproduce its manifest: the top-1
#                 the GPU measured, and every prediction where the manifest names them (the exported files)
#   tune          tune prune --device auto, 4 trials sharing the GPU (Ray's default share, 0.25 each): all finish,
#                 no row of any trial says "cpu"
#   channels      bench/channel_speed.py on the GPU: the dense ResNet-20 against channel-pruned copies (half and
#                 0.4 of its MACs), bf16 autocast, eager and compiled, at batch 1, 32 and 256 (figures, no pass/fail
#                 beyond running)
#   tests         two pytest runs side by side: `pytest -m gpu` (every test passes and none skips: a skip on a
#                 GPU machine is a failure), and the tests that run on CUDA where there is one (those taking the
#                 `device` or `cuda` fixture, tests/test_devices.py, and the resume/damaged/compiled tests of
#                 test_train_job.py, whose PruneSpec's default device is auto), less the `gpu` ones
# A step that fails does not stop the others; a step that needs one that failed is skipped.
#
# Data: $COMPRESS_DATA and $COMPRESS_WEIGHTS, else ../shared/data and ../shared/weights/resnet20-12fca82f.th,
# else (or with GPU_CHECK_SYNTHETIC=1) a synthetic CIFAR-10 (class colours and noise, in the binary layout;
# 20,000 training and 2,000 test images) and seeded starting weights are written under the work folder: every
# check above holds on them, only the accuracies mean nothing.
# Python: .venv/bin/python; else a python3 that imports what the project needs (with PYTHONPATH=<repo>);
# else .venv is made from ../shared/wheels (pip --no-index); nothing is downloaded.
# Where there is no GPU (no nvidia-smi, none listed, or torch sees no CUDA) it prints one line and exits 0.
# Limits: ${GPU_CHECK_LIMIT:-480} s in all (a step gets what is left, at most its own limit). Work folder:
# ${GPU_CHECK_DIR:-bench-work/gpu-check} (emptied first); logs and the summary are copied to $OUT when set.
# At exit: the nvidia-smi sampler is stopped, and the Ray instances the steps started (found by their temp dirs,
# <work>/.../tune/<search>/ray, with sweeps.search.stop_leftovers) are ended; other Ray processes are left alone.
# GPU_CHECK_REHEARSE=1 runs the same steps on the CPU at tiny sizes, on synthetic data (the tests step
# skipped): it tests this script, not a GPU.
#
# bench/gpu_campaign.sh sources this file for its helpers (everything above the "this check" line).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

# ---------------------------------------------------------------------------------------------------------------
# helpers, shared with bench/gpu_campaign.sh
# ---------------------------------------------------------------------------------------------------------------

REHEARSE=${GPU_CHECK_REHEARSE:-}
NEEDS="torch torchvision torchao ray submitit pyarrow pandas scipy numpy click rich_click tqdm"

no_gpu() {  # no_gpu WHY: the one line of a machine without a GPU, exit 0
    echo "no GPU: $1; $(basename "$0") checked nothing"
    exit 0
}

find_python() {  # find_python EXTRA_MODULES...: set PY (absolute) or say what is missing and exit 1
    local mods="$NEEDS $*" try
    if [ -x "$REPO/.venv/bin/python" ]; then
        PY=$REPO/.venv/bin/python
        return
    fi
    try=$(command -v python3 || true)
    if [ -n "$try" ] && "$try" -c "import ${mods// /, }" 2>/dev/null; then
        PY=$try
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        return
    fi
    if [ -d "$REPO/../shared/wheels" ] && [ -n "$try" ]; then
        echo "== installing into .venv from ../shared/wheels (no network)"
        "$try" -m venv "$REPO/.venv" \
            && "$REPO/.venv/bin/pip" install -q --no-index --find-links "$REPO/../shared/wheels" -e "${REPO}[dev]"
        PY=$REPO/.venv/bin/python
        return
    fi
    echo "needs $REPO/.venv, or a python3 that imports ${mods// /, }, or wheels in ../shared/wheels to install from"
    exit 1
}

gpu_setup() {  # gpu_setup WORK EXTRA_MODULES...: no GPU -> one line; else PY, GPU_NAME, DEV, the sampler, the trap
    WORK=$1
    shift
    if [ -z "$REHEARSE" ]; then
        command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
        local listed
        listed=$(nvidia-smi -L 2>/dev/null || true)  # read whole: grep -q under pipefail can fail the pipe
        [[ $listed = *"GPU "* ]] || no_gpu "nvidia-smi lists no GPU"
    fi
    find_python "$@"
    if [ -z "$REHEARSE" ]; then
        local why
        why=$("$PY" -c 'import torch
if not torch.cuda.is_available():
    print(f"nvidia-smi lists a GPU but torch {torch.__version__} sees no CUDA device (" + (
          "a CPU-only build" if torch.version.cuda is None else
          f"built for CUDA {torch.version.cuda}: a driver too old for it, or CUDA_VISIBLE_DEVICES empty") + ")")' \
            2>/dev/null | tail -n 1) || why="$PY cannot import torch (try: $PY -c 'import torch')"
        [ -z "$why" ] || no_gpu "$why"
        GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
        DEV=cuda
    else
        GPU_NAME=cpu
        DEV=cpu
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    export PY GPU_NAME DEV WORK
    if [ -d "$WORK" ] && [ ! -f "$WORK/steps.tsv" ] && [ -n "$(ls -A "$WORK")" ]; then
        echo "refusing to empty $WORK: it is not a work folder of these scripts (no steps.tsv); choose another"
        exit 2
    fi
    rm -rf "$WORK"
    mkdir -p "$WORK"
    CHECKS=$WORK/checks.py
    export CHECKS
    write_checks "$CHECKS"
    : > "$WORK/gpu.csv"
    : > "$WORK/steps.tsv"
    : > "$WORK/runs.tsv"
    SMI=
    if [ -z "$REHEARSE" ]; then  # one line per GPU per second: index, utilisation %, memory MiB
        nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
            > "$WORK/gpu.csv" 2>/dev/null &
        SMI=$!
    fi
    RAY_ROOTS=("$WORK")  # folders whose Ray instances (<...>/tune/<search>/ray) are ours to end at exit
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    START=$SECONDS
    FAILED=()
}

stop_sampler() {
    if [ -n "${SMI:-}" ]; then
        kill "$SMI" 2>/dev/null || true
        SMI=
    fi
}

cleanup() {  # the sampler, then the Ray instances our searches started (a search cut by its step limit can leave
             # Ray's daemons behind); not `ray stop --force`, which ends every Ray process of this user on the machine
    stop_sampler
    "$PY" "$CHECKS" ray-stop "${RAY_ROOTS[@]}" || true
}

describe_machine() {  # the lines a reader needs to compare this run with another
    if [ -z "$REHEARSE" ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | sed 's/^/gpu: /'
    else
        echo "REHEARSAL on the CPU at tiny sizes (GPU_CHECK_REHEARSE set): this tests the script, not a GPU"
    fi
    "$PY" - <<'EOF'
import os, shutil, sys
import torch
print(f"python: {sys.executable} {sys.version.split()[0]}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{os.cpu_count()} CPUs")
if torch.cuda.is_available():
    cap = torch.cuda.get_device_capability(0)
    print(f"cuda:0: {torch.cuda.get_device_name(0)}, capability {cap[0]}.{cap[1]}, "
          f"bf16 {'native' if torch.cuda.is_bf16_supported(including_emulation=False) else 'EMULATED'}")
cc = shutil.which(os.environ.get("CC") or "gcc") or shutil.which("cc") or shutil.which("clang")
print(f"C compiler: {cc or 'NONE: torch.compile on CUDA (Triton) needs one, expect the compiled steps to fail'}")
EOF
}

step() {  # step NAME LIMIT COMMAND...: run it (output in $WORK/NAME.log) for at most LIMIT s (5x in a rehearsal on
          # the CPU) and what is left of the total; a line in steps.tsv; returns 1 when it failed
    local name=$1 limit=$2 left rc=0 t0 first last status
    shift 2
    [ -z "$REHEARSE" ] || limit=$((limit * 5))
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: NOT RUN: the total limit of ${TOTAL_LIMIT} s is spent"
        printf '%s\t%s\t0\t0\t0\n' "$name" "not run" >> "$WORK/steps.tsv"
        FAILED+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$SECONDS
    first=$(wc -l < "$WORK/gpu.csv")
    echo "== $name (at most ${limit} s)"
    timeout --kill-after=15 "$limit" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
    last=$(wc -l < "$WORK/gpu.csv")
    if [ "$rc" -eq 0 ]; then
        status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="FAILED: over ${limit} s"
    else
        status="FAILED: exit $rc"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$first" "$last" >> "$WORK/steps.tsv"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
        echo "   $name $status after $((SECONDS - t0)) s; the end of $WORK/$name.log:"
        tail -n 30 "$WORK/$name.log" | sed 's/^/   | /'
        return 1
    fi
    echo "   $name: ok, $((SECONDS - t0)) s"
}

skip() {  # skip NAME WHY: a step not run because one it needs failed
    echo "== $1: SKIPPED: $2"
    printf '%s\t%s\t0\t0\t0\n' "$1" "skipped: $2" >> "$WORK/steps.tsv"
    FAILED+=("$1")
}

finish() {  # the table of steps, $OUT, and the exit status
    local total=$((SECONDS - START))
    sleep 1
    stop_sampler
    "$PY" "$CHECKS" gpu-use "$WORK" "$RESULTS" | tee "$WORK/summary.txt" || true
    echo "total: ${total} s (limit ${TOTAL_LIMIT} s)" | tee -a "$WORK/summary.txt"
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        mkdir -p "$OUT/$(basename "$WORK")"
        cp "$WORK"/*.log "$WORK"/*.tsv "$WORK"/gpu.csv "$WORK"/summary.txt "$OUT/$(basename "$WORK")/" 2>/dev/null || true
    fi
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "FAILED: ${FAILED[*]} (logs in $WORK)"
        exit 1
    fi
    echo "ok: every step passed"
}

launch() { "$PY" -m jobs.launch "$@"; }

runs() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/runs.tsv"; }  # runs STEP run|search ID: for images/s

fail() { echo "FAIL: $*"; exit 1; }

find_data() {  # find_data [synthetic-ok]: $COMPRESS_DATA/$COMPRESS_WEIGHTS, else ../shared; with synthetic-ok
               # what is missing is made up (a synthetic CIFAR-10, seeded weights), else it is one line and exit 1
    local shared data_ok=0 weights_ok=0
    shared=$(cd "$REPO/.." && pwd)/shared
    COMPRESS_DATA=${COMPRESS_DATA:-$shared/data}
    COMPRESS_WEIGHTS=${COMPRESS_WEIGHTS:-$shared/weights/resnet20-12fca82f.th}
    if [ -d "$COMPRESS_DATA/cifar-10-batches-bin" ] || [ -d "$COMPRESS_DATA/cifar-10-batches-py" ]; then
        data_ok=1
    fi
    if [ -n "${GPU_CHECK_SYNTHETIC:-}" ] && [ "${1:-}" = synthetic-ok ]; then
        data_ok=0
    fi
    if [ -f "$COMPRESS_WEIGHTS" ]; then
        weights_ok=1
    fi
    if [ "$data_ok$weights_ok" != 11 ] && [ "${1:-}" != synthetic-ok ]; then
        echo "needs the real CIFAR-10 and starting weights: set COMPRESS_DATA (now $COMPRESS_DATA) and" \
             "COMPRESS_WEIGHTS (now $COMPRESS_WEIGHTS)"
        exit 1
    fi
    DATA_KIND="CIFAR-10 at $COMPRESS_DATA"
    if [ "$data_ok" = 0 ]; then
        COMPRESS_DATA=$WORK/data
        "$PY" "$CHECKS" synth "$COMPRESS_DATA" "${SYNTH_SIZES[@]}"
        DATA_KIND="SYNTHETIC CIFAR-10 at $COMPRESS_DATA (${SYNTH_SIZES[*]} images; the accuracies mean nothing)"
    fi
    if [ "$weights_ok" = 0 ]; then
        COMPRESS_WEIGHTS=$WORK/data/resnet20a-seed0.pt
        "$PY" "$CHECKS" weights "$COMPRESS_WEIGHTS"
    fi
    export COMPRESS_DATA COMPRESS_WEIGHTS
    echo "data: $DATA_KIND; starting weights $COMPRESS_WEIGHTS"
}

write_checks() {  # the Python half: checks on the rows the steps wrote, and the tables
    cat > "$1" <<'EOF'
"""Checks and tables of bench/gpu_check.sh and bench/gpu_campaign.sh, from the Parquet rows the steps wrote.

    python checks.py kill-at RESULTS RUN PID PHASE EPOCH    kill -9 PID once RUN's progress.json reaches PHASE/EPOCH
    python checks.py same RESULTS STRAIGHT RESUMED          a resumed run's rows and final.pt equal an uninterrupted one's
    python checks.py device RESULTS EXPECTED RUN...         every row of these runs names device EXPECTED
    python checks.py search RESULTS EXPECTED SEARCH N       N trials, each finished, every row on EXPECTED
    python checks.py ptq RESULTS RUN EXPECTED MAX_GAP       calibrated on EXPECTED, int8 within MAX_GAP points of float
    python checks.py best RESULTS SEARCH MAX_DROP           the best trial's run id, by the search's own objective
    python checks.py campaign RESULTS SEARCH PTQ_RUN MAX_DROP   the campaign's table
    python checks.py gpu-use WORK RESULTS                   seconds, GPU use and images/s per step
    python checks.py ray-stop ROOT...                       end the Ray instances of the searches under ROOTs
    python checks.py synth ROOT TRAIN TEST                  a synthetic CIFAR-10 in the binary layout
    python checks.py weights PATH                           seeded resnet20a starting weights

A failed check prints what differs and exits 1.
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

PHASE_COLS = ["target_sparsity", "sparsity", "nonzero", "prunable", "top1", "test_loss", "train_loss", "train_acc",
              "epochs", "predictions"]
EPOCH_COLS = ["lr", "train_loss", "train_acc", "test_loss", "top1"]
MODULE_COLS = ["nonzero_before", "nonzero_after", "sparsity"]


def table(results, name):
    import pandas as pd
    from compress.results import read_table

    try:
        return read_table(results, name).to_pandas()
    except FileNotFoundError:
        return pd.DataFrame(columns=["run_id", "search_id", "trial_id", "device_name"])


def fail(*lines):
    for line in lines:
        print(line)
    sys.exit(1)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_at(results, run, pid, phase, epoch, timeout=600.0):
    path = Path(results) / "runs" / run / "progress.json"
    pid, want = int(pid), (int(phase), int(epoch))
    end = time.monotonic() + timeout
    p = {}
    while time.monotonic() < end:
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            p = {}
        if p and not p.get("finished") and (p["phase"], p["epoch"]) >= want:
            os.kill(pid, signal.SIGKILL)
            print(f"killed {run} (pid {pid}) with kill -9 at phase {p['phase']}, epoch {p['epoch']} of "
                  f"{p.get('epochs')} done (the next one in flight)")
            return
        if not alive(pid):
            fail(f"{run} ended before phase {want[0]} epoch {want[1]} (its progress: {p or 'none'}): nothing was "
                 f"killed, so nothing was checked; see its log (raise --train-size if it was simply too quick)")
        time.sleep(0.05)
    fail(f"{run} did not reach phase {want[0]} epoch {want[1]} in {timeout:.0f} s (its progress: {p or 'none'})")


def _equal(a, b):
    if isinstance(a, bytes | bytearray) or isinstance(b, bytes | bytearray):
        return a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(a, b):
    if isinstance(a, bytes | bytearray) and isinstance(b, bytes | bytearray):
        n = min(len(a), len(b))
        return f"predicted classes differ on {sum(x != y for x, y in zip(a[:n], b[:n]))} of {n} images"
    return f"{a!r} against {b!r}"


def same(results, a, b):
    import torch

    diffs = []
    for name, keys, cols in (("phases", ["phase"], PHASE_COLS), ("epochs", ["phase", "epoch"], EPOCH_COLS),
                             ("modules", ["module"], MODULE_COLS)):
        t = table(results, name)
        x, y = t[t["run_id"] == a], t[t["run_id"] == b]
        for run, d in ((a, x), (b, y)):
            if d.empty:
                diffs.append(f"{name}: no rows of {run}")
            dup = d[d.duplicated(subset=keys, keep=False)]
            if not dup.empty:
                diffs.append(f"{name}: {run} has duplicated rows at {dup[keys].drop_duplicates().values.tolist()}")
        m = x.merge(y, on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
        for _, r in m.iterrows():
            where = ", ".join(f"{k} {r[k]}" for k in keys)
            if r["_merge"] != "both":
                diffs.append(f"{name} {where}: only in {a if r['_merge'] == 'left_only' else b}")
                continue
            for c in cols:
                if not _equal(r[f"{c}_a"], r[f"{c}_b"]):
                    diffs.append(f"{name} {where}: {c} {_show(r[f'{c}_a'], r[f'{c}_b'])}")
        if name == "phases":
            print(f"phase rows ({a} | {b}):")
            print("  phase  top-1 (%)        sparsity           nonzero          train loss")
            for _, r in m[m["_merge"] == "both"].sort_values("phase").iterrows():
                print(f"  {r['phase']:>5}  {r['top1_a']:6.2f} | {r['top1_b']:6.2f}  {r['sparsity_a']:.5f} | "
                      f"{r['sparsity_b']:.5f}  {r['nonzero_a']:>7} | {r['nonzero_b']:<7}  "
                      f"{r['train_loss_a']:.6f} | {r['train_loss_b']:.6f}")
    finals = [Path(results) / "runs" / run / "final.pt" for run in (a, b)]
    if all(f.is_file() for f in finals):
        sa, sb = (torch.load(f, map_location="cpu", weights_only=True)["model"] for f in finals)
        for k in sorted(set(sa) | set(sb)):
            if k not in sa or k not in sb:
                diffs.append(f"final.pt: {k} only in {a if k in sa else b}")
            elif not torch.equal(sa[k], sb[k]):
                d = (sa[k].double() - sb[k].double()).abs().max().item() if sa[k].is_floating_point() else "-"
                diffs.append(f"final.pt: {k} differs (max |difference| {d})")
    else:
        diffs.append(f"final.pt missing: {', '.join(str(f) for f in finals if not f.is_file())}")
    if diffs:
        fail(f"the resumed run {b} differs from the uninterrupted {a} in {len(diffs)} place(s):",
             *[f"  {d}" for d in diffs[:60]], *(["  ..."] if len(diffs) > 60 else []))
    print(f"{b} (killed, resumed) equals {a} (uninterrupted): every phase, epoch and module row, and final.pt")


def _rates(epochs, run):
    r = epochs.loc[epochs["run_id"] == run, "images_per_second"]
    return f"{r.mean():,.0f} images/s (mean of {len(r)} epochs)" if len(r) else "no epoch rows"


def device(results, expected, *runs):
    phases, epochs = table(results, "phases"), table(results, "epochs")
    bad = []
    for run in runs:
        names = set(phases.loc[phases["run_id"] == run, "device_name"]) | set(
            epochs.loc[epochs["run_id"] == run, "device_name"])
        if not names:
            bad.append(f"{run}: no rows")
        elif names != {expected}:
            bad.append(f"{run}: rows say {sorted(names)}, not {expected!r}")
        else:
            print(f"{run}: every row on {expected}; {_rates(epochs, run)}")
    if bad:
        fail(*bad)


def _varying(rows):
    cols = [c for c in rows.columns if c.startswith("spec_") and c not in ("spec_run_id",)]
    return [c for c in cols if rows[c].astype(str).nunique() > 1]


def search(results, expected, search_id, n):
    phases, epochs = table(results, "phases"), table(results, "epochs")
    rows = phases[phases["search_id"] == search_id]
    trials = sorted(rows["trial_id"].unique()) if not rows.empty else []
    bad = [] if len(trials) == int(n) else [f"{search_id}: {len(trials)} trials wrote rows, not {n}"]
    varying = _varying(rows) if not rows.empty else []
    for t in trials:
        r = rows[rows["trial_id"] == t]
        run = r["run_id"].iloc[0]
        last = int(r["spec_phases"].iloc[0])
        names = set(r["device_name"]) | set(epochs.loc[epochs["run_id"] == run, "device_name"])
        config = ", ".join(f"{c[5:]}={r[c].iloc[0]}" for c in varying)
        if names != {expected}:
            bad.append(f"trial {t} ({config}): rows say {sorted(names)}, not {expected!r}")
        if last not in set(r["phase"]):
            bad.append(f"trial {t} ({config}): no row of its last phase {last} (it did not finish)")
        print(f"trial {t} ({config}) on {', '.join(sorted(names))}: top-1 {r.sort_values('phase')['top1'].iloc[-1]:.2f}%"
              f"; {_rates(epochs, run)}")
    if bad:
        fail(*bad)


def ptq(results, run, expected, max_gap):
    rows = table(results, "ptq")
    rows = rows[rows["run_id"] == run]
    if rows.empty:
        fail(f"{run}: no PTQ rows")
    bad = []
    for r in rows.itertuples():
        print(f"{r.method:<6} {r.observer:<9} calibrated on {r.device_name} ({r.calib_seconds:.1f} s): float "
              f"{r.float_top1:.2f}% -> int8 {r.int8_top1:.2f}% (int8 evaluated on the CPU, {r.eval_seconds:.1f} s)")
        if r.device_name != expected:
            bad.append(f"{r.method}: calibrated on {r.device_name!r}, not {expected!r}")
        if abs(r.int8_top1 - r.float_top1) > float(max_gap):
            bad.append(f"{r.method}: int8 {r.int8_top1:.2f}% is more than {max_gap} points from float "
                       f"{r.float_top1:.2f}% (ranges calibrated wrong on the device?)")
    if bad:
        fail(*bad)


def _trials(results, search_id, max_drop):
    """One line per trial: its last phase row, the dense top-1 (phase 0), the search's objective."""
    phases, epochs = table(results, "phases"), table(results, "epochs")
    rows = phases[phases["search_id"] == search_id]
    out = []
    for run, r in rows.groupby("run_id"):
        r = r.sort_values("phase")
        last, dense = r.iloc[-1], r[r["phase"] == 0]["top1"]
        if last["phase"] != last["spec_phases"] or dense.empty:
            continue
        drop = float(dense.iloc[0] - last["top1"])
        e = epochs[epochs["run_id"] == run]
        out.append({"run_id": run, "trial_id": last["trial_id"], "seed": int(last["spec_seed"]),
                    "final_sparsity": float(last["spec_final_sparsity"]), "sparsity": float(last["sparsity"]),
                    "top1": float(last["top1"]), "drop": drop,
                    "score": 100 * float(last["sparsity"]) - 10 * max(0.0, drop - float(max_drop)),
                    "epochs": int(r["epochs"].sum()), "train_s": float(r["train_seconds"].sum()),
                    "images_s": float(e["images_per_second"].mean()) if len(e) else float("nan"),
                    "device": last["device_name"]})
    return out


def best(results, search_id, max_drop):
    trials = _trials(results, search_id, max_drop)
    if not trials:
        fail(f"{search_id}: no finished trial")
    top = max(trials, key=lambda t: (t["score"], t["top1"]))
    print(f"best of {len(trials)}: {top['run_id']} (sparsity {top['sparsity']:.4f}, top-1 {top['top1']:.2f}%, "
          f"score {top['score']:.2f})", file=sys.stderr)
    print(top["run_id"])


def campaign(results, search_id, ptq_run, max_drop):
    trials = _trials(results, search_id, max_drop)
    print(f"search {search_id}: {len(trials)} finished trials (score = 100*sparsity - 10*(drop beyond {max_drop}))")
    print("  trial            seed  sparsity  top-1 (%)  drop (pp)  score   epochs  train (s)  images/s  device")
    for t in sorted(trials, key=lambda t: (t["final_sparsity"], t["seed"])):
        print(f"  {t['trial_id']:<16} {t['seed']:>4}  {t['sparsity']:8.4f}  {t['top1']:9.2f}  {t['drop']:9.2f}  "
              f"{t['score']:6.2f}  {t['epochs']:>6}  {t['train_s']:9.1f}  {t['images_s']:8,.0f}  {t['device']}")
    for s in sorted({t["final_sparsity"] for t in trials}):
        top = [t["top1"] for t in trials if t["final_sparsity"] == s]
        print(f"  at {s:.2f}: top-1 mean {sum(top) / len(top):.2f}% over {len(top)} seed(s), spread "
              f"{max(top) - min(top):.2f} pp")
    rows = table(results, "ptq")
    rows = rows[rows["run_id"] == ptq_run]
    for r in rows.itertuples():
        print(f"PTQ {ptq_run} of {Path(r.spec_weights).parent.name}: {r.method} {r.observer} c{r.calib_size}: "
              f"float {r.float_top1:.2f}% -> int8 {r.int8_top1:.2f}% ({r.int8_top1 - r.float_top1:+.2f} pp), "
              f"calibrated on {r.device_name}")
    for manifest in sorted((Path(results) / "runs" / ptq_run / "export").glob("*.json")):
        m = json.loads(manifest.read_text())
        print(f"exported {manifest.with_suffix('').name}: {m.get('bytes', '?'):,} bytes, top-1 {m['expected_top1']:.2f}%")


def gpu_use(work, results):
    work = Path(work)
    samples = []  # per nvidia-smi line: (gpu index, utilisation %, memory MiB), None when unreadable
    for line in (work / "gpu.csv").read_text().splitlines():
        try:
            i, u, m = (int(v.strip()) for v in line.split(","))
            samples.append((i, u, m))
        except ValueError:
            samples.append(None)
    steps = [ln.split("\t") for ln in (work / "steps.tsv").read_text().splitlines() if ln.strip()]
    runs = [ln.split("\t") for ln in (work / "runs.tsv").read_text().splitlines() if ln.strip()]
    epochs, phases = table(results, "epochs"), table(results, "phases")
    print("\nstep          status    seconds  GPU util mean/max (%)  GPU memory max (MiB)  images/s")
    for name, status, seconds, first, last in steps:
        got = [s for s in samples[int(first):int(last)] if s]
        busiest = max({i for i, _, _ in got}, key=lambda i: sum(u for j, u, _ in got if j == i), default=None)
        util = [u for i, u, _ in got if i == busiest]
        use = f"{sum(util) / len(util):.0f} / {max(util)}" if util else "-"
        mem = f"{max(m for _, _, m in got):,}" if got else "-"
        rates = []
        for step_name, kind, ident in runs:
            if step_name != name:
                continue
            if kind == "run":
                r = epochs.loc[epochs["run_id"] == ident, "images_per_second"]
                if len(r):
                    rates.append(f"{ident} {r.mean():,.0f}")
            else:
                r = epochs[epochs["search_id"] == ident].groupby("trial_id")["images_per_second"].mean()
                if len(r):
                    rates.append(f"{len(r)} trials at once {' + '.join(f'{v:,.0f}' for v in r)} = {r.sum():,.0f}")
        print(f"{name:<13} {status.split(':')[0]:<8} {seconds:>8}  {use:>21}  {mem:>20}  {'; '.join(rates) or '-'}")
    for name, status, *_ in steps:
        if status != "ok":
            print(f"  {name}: {status}")


def ray_stop(*roots):
    """End the Ray instances whose temp dir (``<...>/tune/<search>/ray``) is under ``roots``, and nothing else."""
    from sweeps.search import stop_leftovers

    found = set()
    for root in map(Path, roots):
        if root.is_dir():
            found |= {p for p in [root / "ray", *root.rglob("ray")] if p.exists() and
                      (p == root / "ray" or p.parent.parent.name == "tune")}
    ended = 0
    for ray in sorted(found):
        try:
            ended += stop_leftovers(str(ray.resolve()))
        except ValueError as e:  # its driver still runs
            print(f"left running: {e}")
    if ended:
        print(f"ended {ended} Ray process(es) of the searches under {', '.join(roots)}")


def synth(root, n_train, n_test):
    """CIFAR-10's binary layout (label byte + 3,072 pixel bytes per image): class colour +-40 noise."""
    import numpy as np

    colours = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]], dtype=np.int16)
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    per = int(n_train) // 5
    for name, n, seed in [(f"data_batch_{i}.bin", per, i) for i in range(1, 6)] + [("test_batch.bin", int(n_test), 0)]:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.integers(-40, 41, size=(n, 3, 32, 32), dtype=np.int16)
        images = np.clip(colours[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None].astype(np.uint8), images.reshape(n, -1)], 1).tobytes())


def weights(path):
    import torch
    from compress.models import build_model

    torch.manual_seed(0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model("resnet20a").state_dict(), path)


COMMANDS = {"kill-at": kill_at, "same": same, "device": device, "search": search, "ptq": ptq, "best": best,
            "campaign": campaign, "gpu-use": gpu_use, "ray-stop": ray_stop, "synth": synth, "weights": weights}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
EOF
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    return 0  # sourced by bench/gpu_campaign.sh: the helpers only
fi

# ---------------------------------------------------------------------------------------------------------------
# this check
# ---------------------------------------------------------------------------------------------------------------

SELF=$REPO/bench/gpu_check.sh
STEPS="auto resume ptq export verify tune channels tests"
# sizes: a kill window of about one epoch of TRAIN images; the prune runs of step resume evaluate the whole test
# set (their model.float.packed manifests name no test size, so verify evaluates all of it)
if [ -z "$REHEARSE" ]; then
    TRAIN=20000 TEST=2000 BATCH=256 TUNE_TRAIN=10000
    SYNTH_SIZES=(20000 2000)
else
    TRAIN=300 TEST=300 BATCH=100 TUNE_TRAIN=300
    SYNTH_SIZES=(1000 300)
    export GPU_CHECK_SYNTHETIC=${GPU_CHECK_SYNTHETIC:-1}
fi
export TRAIN TEST BATCH TUNE_TRAIN

check_auto() {
    runs auto run gpu-auto
    launch prune --device auto --compile off --results "$RESULTS" --run-id gpu-auto --phases 1 --epochs 1 \
        --final-sparsity 0.5 --train-size "$TUNE_TRAIN" --test-size "$TEST" --batch-size "$BATCH"
    "$PY" "$CHECKS" device "$RESULTS" "$GPU_NAME" gpu-auto
}

check_resume() {
    local spec=(--device "$DEV" --results "$RESULTS" --phases 3 --epochs 2 --final-sparsity 0.7 --kd-weight 0.5
                --bn-reestimate --train-size "$TRAIN" --test-size 0 --batch-size "$BATCH" --seed 0)
    local straight victim rc=0
    runs resume run gpu-straight
    runs resume run gpu-killed
    "$PY" -m jobs.launch prune "${spec[@]}" --run-id gpu-straight > "$WORK/resume-straight.log" 2>&1 &
    straight=$!
    "$PY" -m jobs.launch prune "${spec[@]}" --run-id gpu-killed > "$WORK/resume-killed.log" 2>&1 &
    victim=$!
    echo "started gpu-straight (pid $straight) and gpu-killed (pid $victim) side by side: ${spec[*]}"
    "$PY" "$CHECKS" kill-at "$RESULTS" gpu-killed "$victim" 2 1 || rc=$?
    wait "$victim" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 15 "$WORK/resume-killed.log"
        kill "$straight" 2>/dev/null || true
        fail "no kill: see above"
    fi
    echo "the killed run's log ends:"
    grep -E 'INFO|WARNING|rror' "$WORK/resume-killed.log" | tail -n 3 | sed 's/^/  | /' || true
    launch prune --resume gpu-killed --results "$RESULTS" || fail "prune --resume gpu-killed failed (above)"
    wait "$straight" || { tail -n 20 "$WORK/resume-straight.log"; fail "the uninterrupted run gpu-straight failed"; }
    "$PY" "$CHECKS" device "$RESULTS" "$GPU_NAME" gpu-straight gpu-killed
    "$PY" "$CHECKS" same "$RESULTS" gpu-straight gpu-killed
}

check_ptq() {
    launch ptq --run gpu-straight --device "$DEV" --methods pt2e,manual --observers histogram --calib-sizes 1000 \
        --test-size "$TEST" --results "$RESULTS" --run-id gpu-ptq
    "$PY" "$CHECKS" ptq "$RESULTS" gpu-ptq "$GPU_NAME" 3.0
}

check_export() {
    local method out
    for method in pt2e manual; do
        out=$WORK/export-$method.out
        launch export gpu-ptq --select "method=$method" --device "$DEV" --results "$RESULTS" 2>&1 | tee "$out"
        if grep -q 'warning:' "$out"; then
            fail "export of the $method row rebuilt a model that scores differently from its row, calibrating on" \
                 "the same device: calibration on $DEV does not reproduce itself"
        fi
    done
}

check_verify() {
    local files=() f bad=()
    shopt -s nullglob
    files=("$RESULTS"/runs/gpu-ptq/export/*.int8.pt2 "$RESULTS"/runs/gpu-ptq/export/*.int8.pt2pack
           "$RESULTS"/runs/gpu-straight/export/model.float.packed)
    [ "${#files[@]}" -eq 5 ] || fail "expected 5 files to verify (.int8.pt2 and .int8.pt2pack of pt2e and manual," \
                                     "model.float.packed), found ${#files[@]}: ${files[*]}"
    for f in "${files[@]}"; do
        echo "-- verify $f"
        launch verify "$f" || bad+=("$f")
    done
    [ "${#bad[@]}" -eq 0 ] || fail "verify failed for ${bad[*]}: re-evaluated on the CPU, it does not reproduce" \
                                   "what its manifest says was measured"
}

check_tune() {
    runs tune search gpu-tune
    launch tune prune --device auto --searcher grid --space lr=grid:0.0005,0.001,0.002,0.004 --num-samples 1 \
        --max-concurrent 4 --scheduler fifo --phases 1 --epochs 2 --final-sparsity 0.5 --train-size "$TUNE_TRAIN" \
        --test-size "$TEST" --batch-size "$BATCH" --results "$RESULTS" --search-id gpu-tune
    "$PY" "$CHECKS" search "$RESULTS" "$GPU_NAME" gpu-tune 4
}

check_channels() {  # bf16 throughput of channel-pruned models against the dense one, eager and compiled
    local sizes=1,32,256 repeats=3
    [ -z "$REHEARSE" ] || { sizes=8; repeats=1; }
    "$PY" "$REPO/bench/channel_speed.py" --device "$DEV" --targets 0.5,0.4 --batch-sizes "$sizes" \
        --repeats "$repeats" --seconds 0.5 --weights "$COMPRESS_WEIGHTS" --data-root "$COMPRESS_DATA"
}

check_tests() {  # pytest -m gpu, and the tests that run on CUDA where there is one, side by side
    cat > "$WORK/gpu_select.py" <<'EOF'
"""pytest plugin of bench/gpu_check.sh: keep the tests that run on CUDA where there is one, less the `gpu` ones."""
NAMED = {"test_devices.py": ("",), "test_train_job.py": ("resume", "damaged", "compiled", "device")}


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        uses = bool({"device", "cuda"} & set(getattr(item, "fixturenames", ())))
        named = any(word in item.name for word in NAMED.get(item.path.name, ()))
        (keep if (uses or named) and item.get_closest_marker("gpu") is None else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
EOF
    local gpu device rc_gpu=0 rc_device=0
    "$PY" -m pytest -m gpu -p no:cacheprovider -q --basetemp="$WORK/pytest-gpu" > "$WORK/tests-gpu.log" 2>&1 &
    gpu=$!
    PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -p gpu_select -p no:cacheprovider -q \
        --basetemp="$WORK/pytest-device" > "$WORK/tests-device.log" 2>&1 &
    device=$!
    wait "$gpu" || rc_gpu=$?
    wait "$device" || rc_device=$?
    echo "pytest -m gpu (exit $rc_gpu):"
    grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed|error' "$WORK/tests-gpu.log" | tail -n 25 | sed 's/^/  /' || true
    echo "the tests that run on CUDA where there is one (exit $rc_device):"
    grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed|error' "$WORK/tests-device.log" | tail -n 25 | sed 's/^/  /' || true
    [ "$rc_gpu" -eq 0 ] || fail "pytest -m gpu failed: $WORK/tests-gpu.log"
    [ "$rc_device" -eq 0 ] || fail "the device tests failed: $WORK/tests-device.log"
    if grep -q '^SKIPPED' "$WORK/tests-gpu.log"; then
        fail "gpu tests skipped on a machine with a GPU (the SKIPPED lines above say why)"
    fi
}

if [ "${1:-}" = --step ]; then  # one step, in its own process so that `timeout` ends all of it
    "check_${2//-/_}"
    exit
fi

# the steps asked for, with the steps they need
WANT=" ${GPU_CHECK_STEPS:-$STEPS} "
WANT=${WANT//,/ }
[[ $WANT = *" verify "* ]] && WANT+=" export "
[[ $WANT = *" export "* ]] && WANT+=" ptq "
[[ $WANT = *" ptq "* ]] && WANT+=" resume "
for s in $WANT; do
    [[ " $STEPS " = *" $s "* ]] || { echo "unknown step '$s' in GPU_CHECK_STEPS; steps: $STEPS"; exit 2; }
done
wanted() { [[ $WANT = *" $1 "* ]]; }

WORK=${GPU_CHECK_DIR:-bench-work/gpu-check}
[[ $WORK = /* ]] || WORK=$REPO/$WORK
gpu_setup "$WORK" pytest
RESULTS=$WORK/results
export RESULTS
TOTAL_LIMIT=${GPU_CHECK_LIMIT:-480}
[ -z "$REHEARSE" ] || TOTAL_LIMIT=${GPU_CHECK_LIMIT:-2400}
DEADLINE=$((SECONDS + TOTAL_LIMIT))
describe_machine
find_data synthetic-ok

limit_of() {  # seconds each step may take at most on a GPU (H100 estimates in docs/running.md, "On a GPU")
    case $1 in
        auto) echo 90 ;; resume) echo 240 ;; ptq) echo 150 ;; export) echo 120 ;; verify) echo 90 ;;
        tune) echo 240 ;; channels) echo 120 ;; tests) echo 300 ;;
    esac
}
not_ready() {  # not_ready STEP: why STEP has nothing to work on ('' when it has)
    case $1 in
        ptq) [ -f "$RESULTS/runs/gpu-straight/summary.json" ] || echo "the run gpu-straight (step resume) did not finish" ;;
        export) compgen -G "$RESULTS/ptq/gpu-ptq-*.parquet" >/dev/null || echo "no PTQ rows of gpu-ptq (step ptq)" ;;
        verify) [ -d "$RESULTS/runs/gpu-ptq/export" ] || echo "nothing was exported (step export)" ;;
    esac
}

for s in $STEPS; do
    wanted "$s" || continue
    if [ -n "$REHEARSE" ] && [ "$s" = tests ]; then
        printf '%s\t%s\t0\t0\t0\n' "$s" "skipped: rehearsal" >> "$WORK/steps.tsv"
        echo "== $s: skipped in a rehearsal"
        continue
    fi
    why=$(not_ready "$s")
    if [ -n "$why" ]; then
        skip "$s" "$why"
        continue
    fi
    step "$s" "$(limit_of "$s")" bash "$SELF" --step "$s" || true
done
finish
