#!/usr/bin/env bash
# Fine-tune from a pretrained run (weights only: EP size and world size may differ).
#   launch/finetune.sh RECIPE INIT_FROM RUN_DIR [--set key=value ...]
#   DATA=runs/demo/data/vqa TOKENIZER=runs/demo/tokenizer launch/finetune.sh launch/recipes/vqa.yaml runs/vl runs/vqa
# Environment: as launch/pretrain.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -ge 3 ]] || { sed -n 2,5p "$0" >&2; exit 2; }
recipe="$1"; init_from="$2"; run_dir="$3"; shift 3
extra=()
if [[ -n "${DATA:-}" ]]; then
  data_sets "$DATA" "${EVAL_SPLIT:-val}" "${TOKENIZER:-}"
  extra=("${DATA_SETS[@]}")
fi
train "$recipe" "$run_dir" --set "init_from=$init_from" "${extra[@]}" "$@"
