#!/usr/bin/env bash
# The paper's runs planned with the TPU compiler (ahead of time, on this CPU host): a Llama-3.2-1B
# MLA student (r_kv 64) at sequence 2048, global batch 64, with the 1B, 3B and 8B teachers, on
# TPU v5e-16, v5e-64 and v5p-8, each at the shipped configs/r_kv_64.py (v5p-8 has 4 chips, which
# the shipped fsdp 8 does not divide: it is planned at fsdp 4). One JSON per point under results/;
# `python -m experiments.paper_plans.table` turns them into the README table.
#   bash experiments/paper_plans/run.sh [kd|dpo]
set -uo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-.venv/bin/python}"
kind="${1:-kd}"
out=experiments/paper_plans/results
mkdir -p "$out"
for topo in v5e:4x4 v5e:8x8 v5p:2x2x1; do
  extra=()
  [ "$topo" = v5p:2x2x1 ] && extra=(--config.mesh.fsdp=4)
  teachers=(1b 3b 8b)
  [ "$kind" = dpo ] && teachers=(1b 8b)   # DPO runs the student alone; 8b differs only in dpo.accum
  for teacher in "${teachers[@]}"; do
    name="${kind}_${teacher}_${topo//:/_}"
    [ -s "$out/$name.json" ] && continue
    echo "== $name" >&2
    "$py" -m xecomla.tools.plan --config="configs/r_kv_64.py:teacher=$teacher" --topology="$topo" \
      --steps="$kind" --confirm=1 "${extra[@]}" --json="$out/$name.json" > "$out/$name.txt" 2>&1 \
      || echo "   failed: see $out/$name.txt" >&2
  done
done
