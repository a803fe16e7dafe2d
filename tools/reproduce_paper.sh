#!/usr/bin/env bash
# Every table and figure of tools.paper on one data set, into OUT (runs are reused when their
# config is unchanged, so the script can be run again after an interruption):
#   bash tools/reproduce_paper.sh configs/S5VH/ucf.py work_dirs/paper/ucf [--cfg-options ...]
# The main table, the ablation and the convergence runs train side by side (they are small next
# to one GPU); the backbone comparison, which reports time per epoch, trains alone afterwards.
set -euo pipefail
config=$1 out=$2
shift 2
paper() { python -m tools.paper "$@" --config "$config" --out "$out" "${extra[@]}"; }
extra=("$@")
mkdir -p "$out"
paper main > "$out/main.out" 2>&1 &
paper ablation > "$out/ablation.out" 2>&1 &
paper convergence > "$out/convergence.out" 2>&1 &
wait
paper backbones > "$out/backbones.out" 2>&1
paper curves > "$out/curves.out" 2>&1
paper tsne > "$out/tsne.out" 2>&1
cat "$out"/{main,ablation,backbones,convergence,curves,tsne}.md
