#!/usr/bin/env bash
# Every table and figure of tools.paper on one data set, into OUT (runs are reused when their
# config is unchanged, so the script can be run again after an interruption):
#   bash tools/reproduce_paper.sh configs/S5VH/ucf.py work_dirs/paper/ucf [--cfg-options ...]
# The main table, the ablation and the convergence runs train side by side (they are small next
# to one GPU); the backbone comparison, which reports time per epoch, trains alone afterwards.
# Each phase's wall time goes to OUT/times.txt and ends the output.
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
together() {     # a failing experiment stops the script once the three have ended
    local pids=() name status=0
    for name in main ablation convergence; do
        paper "$name" > "$out/$name.out" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    return "$status"
}
timed "main, ablation, convergence (together)" together
for experiment in backbones curves tsne; do
    timed "$experiment" paper "$experiment" > "$out/$experiment.out" 2>&1
done
cat "$out"/{main,ablation,backbones,convergence,curves,tsne}.md "$out/times.txt"
