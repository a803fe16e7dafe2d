#!/usr/bin/env bash
# Every table and figure of tools.paper on one data set, into OUT (runs are reused when their
# config is unchanged, so the script can be run again after an interruption):
#   bash tools/reproduce_paper.sh configs/S5VH/ucf.py work_dirs/paper/ucf [--cfg-options ...]
# One process (it starts, imports and reads the features once): the backbone comparison, which
# reports time per epoch, trains its runs one at a time first; then the main table, the
# ablation, the convergence runs, the curves and the t-SNE train theirs together (they are
# small next to one GPU, and runs in one process overlap their kernels where processes take
# turns). In this order the preprocessing of seed 1, which both use and which the data
# directory keeps one seed of at a time, is made once. The wall time goes to OUT/times.txt
# and ends the output; the log (OUT/paper.out) has each part's.
set -euo pipefail
config=$1 out=$2
shift 2
mkdir -p "$out"
began=$SECONDS
python -m tools.paper together backbones main ablation convergence curves tsne \
    --config "$config" --out "$out" "$@" > "$out/paper.out" 2>&1 ||
    { status=$?; tail -n 3 "$out/paper.out" >&2; exit $status; }
echo "all experiments: $((SECONDS - began)) s" > "$out/times.txt"
grep -E "trained and written in|trained together in|outputs written in" "$out/paper.out" \
    >> "$out/times.txt" || true
cat "$out"/{main,ablation,backbones,convergence,curves,tsne}.md "$out/times.txt"
