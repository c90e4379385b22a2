#!/usr/bin/env bash
# Pretraining stage on one node, several (HOSTFILE) or one node of several (NO_SSH=1 NODE_RANK=r).
#   launch/pretrain.sh RECIPE RUN_DIR [--set key=value ...]
#   DATA=runs/demo/data/captions TOKENIZER=runs/demo/tokenizer launch/pretrain.sh launch/recipes/vl_pretrain.yaml runs/vl
# Environment: see launch/common.sh (GPUS_PER_NODE, NNODES, HOSTFILE, NO_SSH, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, DS_CONFIG, RESUME). DATA/TOKENIZER/EVAL_SPLIT [val] point the recipe at a data_prep folder.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -ge 2 ]] || { sed -n 2,7p "$0" >&2; exit 2; }
recipe="$1"; run_dir="$2"; shift 2
extra=()
if [[ -n "${DATA:-}" ]]; then
  data_sets "$DATA" "${EVAL_SPLIT:-val}" "${TOKENIZER:-}"
  extra=("${DATA_SETS[@]}")
fi
train "$recipe" "$run_dir" "${extra[@]}" "$@"
