#!/usr/bin/env bash
# Run (or resume) every tuning and full run that docs/reproducing.md and docs/classification.md report, into the
# committed records under results/. Each step loads the runs whose records already match and trains only the
# missing ones, so the script can be stopped at any time and started again; the whole plan takes many hours on a
# 2-core CPU. Two lanes run side by side, one torch thread each (the records' numbers depend on the thread count):
#   lane A: retrieval --tune UNITER-mini and LXMERT-mini, --full on Tux Paint, UNITER-mini's core arms on openclipart
#   lane B: classification --tune and --full on Tux Paint, --full on openclipart, then LXMERT-mini's core
#           retrieval arms on openclipart (the two lanes write different backbones' records into one folder)
# Usage: scripts/run_experiments.sh [A|B|both]   (default both; logs in results/logs/)
# Set up the data first: scripts/setup_data.sh.
set -uo pipefail

PY="${PYTHON:-python}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p results/logs
export OMP_NUM_THREADS=1

lane_a() {
    local r=(-m advlab.experiments.retrieval --out results/retrieval --no-progress)
    "$PY" "${r[@]}" --tune --backbones uniter --features effnet --epochs 15 &&
    "$PY" "${r[@]}" --tune --backbones lxmert --features effnet --epochs 15 &&
    "$PY" "${r[@]}" --full &&
    "$PY" "${r[@]}" --full --dataset openclipart --out results/retrieval-openclipart --backbones uniter \
        --arms baseline zero noise villa
}

lane_b() {
    local c=(-m advlab.experiments.classification)
    "$PY" "${c[@]}" --tune --out results/classification/tuxpaint &&
    "$PY" "${c[@]}" --full --out results/classification/tuxpaint &&
    "$PY" "${c[@]}" --full --dataset openclipart --out results/classification/openclipart &&
    "$PY" -m advlab.experiments.retrieval --no-progress --full --dataset openclipart --out results/retrieval-openclipart \
        --backbones lxmert --arms baseline zero noise villa
}

case "${1:-both}" in
    A) lane_a >> results/logs/lane_a.log 2>&1 ;;
    B) lane_b >> results/logs/lane_b.log 2>&1 ;;
    both) lane_a >> results/logs/lane_a.log 2>&1 & lane_b >> results/logs/lane_b.log 2>&1 & wait ;;
    *) echo "usage: $0 [A|B|both]" >&2; exit 2 ;;
esac
