#!/usr/bin/env bash
# Run every benchmark in turn, each under the machine's CPU lock, writing bench/results/*.json.
#   bash bench/run_all.sh [CHECKPOINT]
# CHECKPOINT: an SFT task checkpoint with the mlp2x_gelu projector (HF LLaVA's), for generation with real
# answer lengths, of the ViT preset (bench/README.md, "Run", has the command).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
LOCK=(flock /tmp/dress-cpu.lock)
checkpoint=(${1:+--checkpoint "$1"})
"${LOCK[@]}" python bench/generation_throughput.py "${checkpoint[@]}" --json bench/results/generation_throughput.json
"${LOCK[@]}" python bench/train_throughput.py --json bench/results/train_throughput.json
"${LOCK[@]}" python bench/crl_step_cost.py --json bench/results/crl_step_cost.json   # reads the main job's NLF shards
"${LOCK[@]}" python bench/train_step_profile.py --profile --json bench/results/train_step_profile.json
"${LOCK[@]}" python bench/data_throughput.py --json bench/results/data_throughput.json
"${LOCK[@]}" python bench/utilization.py --profile --json bench/results/utilization.json
"${LOCK[@]}" python bench/feature_cache.py --json bench/results/feature_cache.json
"${LOCK[@]}" python bench/tower_layout.py --json bench/results/tower_layout.json
"${LOCK[@]}" python bench/memory.py --json bench/results/memory.json
python bench/report.py
