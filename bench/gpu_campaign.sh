#!/usr/bin/env bash
# the pruning recipe (docs/pruning.md), shortened to fit one GPU for 8 minutes: final sparsity 0.95 and 0.98, seeds 0 and 1,
# as one Ray Tune grid search of 4 trials sharing the GPU; then pt2e PTQ of the best trial's model, its export
# and verify, and the table.
#
#     bash bench/gpu_campaign.sh [RESULTS]      # default results/gpu-campaign; real CIFAR-10 and weights needed
#
# Steps (limits in brackets; H100 estimates in docs/running.md, "On a GPU"):
#   tune    [330 s] tune prune --device auto --searcher grid --space final_sparsity=grid:0.95,0.98
#                   --space seed=grid:0,1 --num-samples 1 --max-concurrent 4 --scheduler fifo: 4 trials at once,
#                   0.25 GPU each (Ray's default share); the recipe's options (cubic schedule of 8 phases, KD 0.5
#                   from the dense model, BN re-estimation, SGD lr 0.03, batch 128, conv1 and the classifier
#                   dense, no filter pruning, no RandAugment) with 1-epoch phases and an 8-epoch last phase
#                   (15 epochs instead of 60; CAMPAIGN_EPOCHS and CAMPAIGN_FINAL_EPOCHS change them). Every trial
#                   must finish with every row on the GPU.
#   best    [30 s]  the best trial by the search's objective (100*sparsity - 10*(drop beyond --max-drop 2.5))
#   ptq     [120 s] ptq --run BEST --device cuda --methods pt2e --observers histogram --calib-sizes 10000
#   export  [90 s]  export --select method=pt2e (calibrating on the GPU again; a drift warning fails it)
#   verify  [60 s]  verify of the .pt2 on the CPU: every test prediction as its manifest says
#   report  [60 s]  report RESULTS --run 'SEARCH*' (report.md and plots), then the campaign's table
# The Parquet tables (phases, epochs, modules, ptq) land under RESULTS, logs under RESULTS/logs/SEARCH; all of
# it is copied to $OUT/gpu-campaign when $OUT is set. A search cut short by its limit continues with
#     python -m jobs.launch tune prune --results RESULTS --search-id SEARCH --resume
# CAMPAIGN_SEARCH_ID names the search (default campaign-<time>). Same rules as bench/gpu_check.sh, whose helpers
# this sources: one line and exit 0 without a GPU, nothing downloaded, this search's Ray instance (only) ended
# at exit, CAMPAIGN_LIMIT (default 480 s) in all. GPU_CHECK_REHEARSE=1 rehearses it on the CPU at tiny sizes
# (each step's limit 5x, CAMPAIGN_LIMIT 2400 s).
set -euo pipefail
# shellcheck source=bench/gpu_check.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_check.sh"  # the helpers; it leaves us in the repository root

ROOT=${1:-results/gpu-campaign}
[[ $ROOT = /* ]] || ROOT=$REPO/$ROOT
SEARCH=${CAMPAIGN_SEARCH_ID:-campaign-$(date +%Y%m%d-%H%M%S)}
MAX_DROP=2.5
RESULTS=$ROOT
export RESULTS
gpu_setup "$ROOT/logs/$SEARCH"
RAY_ROOTS=("$ROOT/tune/$SEARCH")  # at exit, end this search's Ray instance only (others may share RESULTS)
TOTAL_LIMIT=${CAMPAIGN_LIMIT:-480}
[ -z "$REHEARSE" ] || TOTAL_LIMIT=${CAMPAIGN_LIMIT:-2400}
DEADLINE=$((SECONDS + TOTAL_LIMIT))
describe_machine
find_data

RECIPE=(--schedule cubic --filter-fraction 0 --keep-dense "conv1,linear" --bn-reestimate --kd-weight 0.5
        --optimizer sgd --lr 0.03 --batch-size 128 --no-randaugment --no-eval-every-epoch)
if [ -z "$REHEARSE" ]; then
    PLAN=(--phases 8 --epochs "${CAMPAIGN_EPOCHS:-1}" --final-epochs "${CAMPAIGN_FINAL_EPOCHS:-8}")
    SIZES=()
    PTQ_SIZES=()
    CALIB=10000
else
    PLAN=(--phases 2 --epochs 1 --final-epochs 1)
    SIZES=(--train-size 500 --test-size 500)
    PTQ_SIZES=(--test-size 500)
    CALIB=200
fi
echo "search $SEARCH into $ROOT: ${PLAN[*]} ${RECIPE[*]} ${SIZES[*]}"

runs tune search "$SEARCH"
if step tune 330 "$PY" -m jobs.launch tune prune --device auto --searcher grid \
        --space final_sparsity=grid:0.95,0.98 --space seed=grid:0,1 --num-samples 1 --max-concurrent 4 \
        --scheduler fifo --max-drop "$MAX_DROP" --results "$ROOT" --search-id "$SEARCH" \
        "${PLAN[@]}" "${RECIPE[@]}" "${SIZES[@]}"; then
    step tune-rows 30 "$PY" "$CHECKS" search "$ROOT" "$GPU_NAME" "$SEARCH" 4 || true
else
    echo "   continue the search: $PY -m jobs.launch tune prune --results $ROOT --search-id $SEARCH --resume"
fi

BEST=
if step best 30 "$PY" "$CHECKS" best "$ROOT" "$SEARCH" "$MAX_DROP"; then
    BEST=$(tail -n 1 "$WORK/best.log")
    echo "   best trial: $(head -n 1 "$WORK/best.log")"
fi
if [ -n "$BEST" ]; then
    step ptq 120 "$PY" -m jobs.launch ptq --run "$BEST" --device "$DEV" --methods pt2e --observers histogram \
        --calib-sizes "$CALIB" "${PTQ_SIZES[@]}" --results "$ROOT" --run-id "$SEARCH-ptq" || true
else
    skip ptq "no best trial"
fi
if compgen -G "$ROOT/ptq/$SEARCH-ptq-*.parquet" >/dev/null; then
    step ptq-rows 30 "$PY" "$CHECKS" ptq "$ROOT" "$SEARCH-ptq" "$GPU_NAME" 3.0 || true
    if step export 90 "$PY" -m jobs.launch export "$SEARCH-ptq" --select method=pt2e --device "$DEV" \
            --results "$ROOT"; then
        if grep -q 'warning:' "$WORK/export.log"; then
            echo "   export FAILED: the rebuilt model does not score its row (drift, above in export.log)"
            FAILED+=(export-drift)
        fi
    fi
else
    skip export "no PTQ rows of $SEARCH-ptq"
fi
shopt -s nullglob
PT2=("$ROOT/runs/$SEARCH-ptq/export/"*.int8.pt2)
if [ "${#PT2[@]}" -eq 1 ]; then
    step verify 60 "$PY" -m jobs.launch verify "${PT2[0]}" || true
else
    skip verify "no exported .pt2"
fi
step report 60 "$PY" -m jobs.launch report "$ROOT" --run "$SEARCH*" --out "$ROOT/report-$SEARCH" || true

echo
"$PY" "$CHECKS" campaign "$ROOT" "$SEARCH" "$SEARCH-ptq" "$MAX_DROP" | tee "$WORK/campaign.txt" || true
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the tables, the report and the manifests come back with the logs
    mkdir -p "$OUT/gpu-campaign"
    for t in phases epochs modules ptq; do
        if [ -d "$ROOT/$t" ]; then
            mkdir -p "$OUT/gpu-campaign/$t"
            cp "$ROOT/$t/$SEARCH"*.parquet "$OUT/gpu-campaign/$t/" 2>/dev/null || true
        fi
    done
    cp -r "$ROOT/report-$SEARCH" "$OUT/gpu-campaign/" 2>/dev/null || true
    cp "$ROOT/runs/$SEARCH-ptq/export/"*.json "$WORK/campaign.txt" "$OUT/gpu-campaign/" 2>/dev/null || true
fi
finish
