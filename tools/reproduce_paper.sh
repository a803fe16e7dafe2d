#!/usr/bin/env bash
# Every table and figure of tools.paper on one data set, into OUT (runs are reused when their
# config is unchanged, so the script can be run again after an interruption):
#   bash tools/reproduce_paper.sh configs/S5VH/ucf.py work_dirs/paper/ucf [--cfg-options ...]
# The backbone comparison, which reports time per epoch, trains its runs one at a time first;
# then the main table, the ablation, the convergence runs, the curves and the t-SNE train theirs
# together in one process (they are small next to one GPU, and runs in one process overlap their
# kernels where processes take turns). In this order the preprocessing of seed 1, which both
# phases use and which the data directory keeps one seed of at a time, is made once. Each
# phase's wall time goes to OUT/times.txt and ends the output.
set -euo pipefail
config=$1 out=$2
shift 2
paper() { python -m tools.paper "$@" --config "$config" --out "$out" "${extra[@]}"; }
extra=("$@")
mkdir -p "$out"
: > "$out/times.txt"
timed() {       # timed NAME COMMAND...: run it, then record its wall time
    local name=$1 began=$SECONDS
    shift
    "$@"
    echo "$name: $((SECONDS - began)) s" >> "$out/times.txt"
}
timed backbones paper backbones > "$out/backbones.out" 2>&1
timed "main, ablation, convergence, curves, tsne (together)" \
    paper together main ablation convergence curves tsne > "$out/together.out" 2>&1
cat "$out"/{main,ablation,backbones,convergence,curves,tsne}.md "$out/times.txt"
