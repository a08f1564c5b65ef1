#!/usr/bin/env bash
# The DRESS experiment on ShapeWorld, from nothing: pretrain -> SFT -> rollout + NLF -> CRL and its
# ablations (score-only condition; no refinement data) plus an SFT control trained as long as CRL ->
# evaluation of every model on the ShapeWorld test split -> bench/results/shapeworld_reproduction.json
# and a Markdown table. About 45 minutes on 2 CPU cores.
#   bash bench/reproduce_shapeworld.sh            (RUN_DIR=runs/repro; stage configs: configs/reproduce/)
# A stage whose checkpoint exists is skipped, so an interrupted run resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUN_DIR=runs/repro                   # fixed: the stage overlays in configs/reproduce/ write here
TIMINGS=$RUN_DIR/timings.tsv
mkdir -p "$RUN_DIR"

stage() {  # stage NAME CHECKPOINT COMMAND...: run COMMAND unless CHECKPOINT exists; record its wall time
  local name=$1 done_file=$2; shift 2
  if [[ -e $done_file ]]; then echo "== $name: $done_file exists, skipped"; return; fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$TIMINGS"
}

fit() {  # fit BASE_CONFIG OVERLAY...: a training stage through the Lightning CLI
  local args=(-c "configs/$1"); shift
  for overlay in "$@"; do args+=(-c "configs/reproduce/$overlay"); done
  $PYTHON -m dress_lightning fit "${args[@]}"
}

stage pretrain $RUN_DIR/pretrain/checkpoints/last.ckpt fit pretrain.yaml pretrain.yaml
stage sft $RUN_DIR/sft/checkpoints/last.ckpt fit sft.yaml sft.yaml
stage rollout $RUN_DIR/nlf/summary.json \
  $PYTHON -m dress_lightning feedback rollout -c configs/rollout.yaml -c configs/reproduce/rollout.yaml
stage crl $RUN_DIR/crl/checkpoints/last.ckpt fit crl.yaml crl.yaml
stage crl_score_only $RUN_DIR/crl_score_only/checkpoints/last.ckpt fit crl.yaml crl.yaml crl_score_only.yaml
stage crl_no_refinement $RUN_DIR/crl_no_refinement/checkpoints/last.ckpt \
  fit crl.yaml crl.yaml crl_no_refinement.yaml
stage sft_more $RUN_DIR/sft_more/checkpoints/last.ckpt fit sft.yaml sft.yaml sft_more.yaml

for model in sft sft_more crl crl_score_only crl_no_refinement; do
  stage "eval_$model" $RUN_DIR/eval/$model/report.json \
    $PYTHON -m dress_lightning evaluate -c configs/eval.yaml \
      --checkpoint $RUN_DIR/$model/checkpoints/last.ckpt --out $RUN_DIR/eval/$model
done

$PYTHON bench/shapeworld_table.py $RUN_DIR --json bench/results/shapeworld_reproduction.json \
  --markdown bench/results/shapeworld_reproduction.md
