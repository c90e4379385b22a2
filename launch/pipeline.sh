#!/usr/bin/env bash
# All stages in order, each stage's final checkpoint feeding the next (init_from = previous run folder).
#   launch/pipeline.sh DATA_ROOT TOKENIZER RUN_ROOT [--set key=value ...]   (--set items apply to every stage)
#   STAGES="text_mlm vl_pretrain" EP_SIZES="2 1" launch/pipeline.sh runs/demo/data runs/demo/tokenizer runs/demo
# DATA_ROOT is a `data_prep synth`-style folder: captions/ (text_mlm, vl_pretrain), vqa/, retrieval/, sounds/
# (audio_retrieval; vla_pretrain mixes captions/ and sounds/ 1:3).
# STAGES: recipe names in launch/recipes [text_mlm vl_pretrain]; EP_SIZES: model.moe.ep_size per stage
# [recipe value]; SETS_<stage>="k=v k2=v2" adds --set items to one stage. A finished stage (RUN/FINISHED,
# written by pipeline.train after the last step) is skipped on rerun; an interrupted one resumes.
# Preempted (stop signal: launch/README.md): exit 0 after the running stage's checkpoint; rerun to continue.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -ge 3 ]] || { sed -n 2,9p "$0" >&2; exit 2; }
data_root="$1"; tokenizer="$2"; run_root="$3"; shift 3
read -r -a stages <<< "${STAGES:-text_mlm vl_pretrain}"
read -r -a ep_sizes <<< "${EP_SIZES:-}"

stage_data() {  # STAGE -> "folder eval_split"
  case "$1" in
    text_mlm|vl_pretrain) echo "$data_root/captions val" ;;
    vqa) echo "$data_root/vqa val" ;;
    retrieval) echo "$data_root/retrieval test" ;;
    vla_pretrain|audio_retrieval) echo "$data_root/sounds test" ;;
    *) echo "$data_root/$1 val" ;;
  esac
}

previous=""
for i in "${!stages[@]}"; do
  stage="${stages[$i]}"
  run_dir="$run_root/$stage"
  read -r folder eval_split <<< "$(stage_data "$stage")"
  data_sets "$folder" "$eval_split" "$tokenizer"
  args=("${DATA_SETS[@]}")
  if [[ "$stage" == vla_pretrain ]]; then  # image-text and audio-text sources, mixed by micro-batch
    args+=(--set "data.train=[{path: $data_root/captions, split: train, weight: 1.0}, {path: $data_root/sounds, split: train, weight: 3.0}]")
  fi
  [[ -n "$previous" ]] && args+=(--set "init_from=$previous")
  [[ -n "${ep_sizes[$i]:-}" ]] && args+=(--set "model.moe.ep_size=${ep_sizes[$i]}")
  stage_sets="SETS_${stage}"
  for item in ${!stage_sets:-}; do args+=(--set "$item"); done
  if [[ -f "$run_dir/FINISHED" ]]; then
    echo "pipeline: $stage already finished in $run_dir, skipping" >&2
  else
    train "launch/recipes/$stage.yaml" "$run_dir" "$@" "${args[@]}"  # stage-specific items win
    if [[ "$PREEMPTED" == 1 ]]; then
      echo "pipeline: preempted during $stage; rerun to resume it and the stages after it" >&2
      exit 0
    fi
    if [[ ! -f "$run_dir/FINISHED" ]]; then
      echo "pipeline: $stage stopped before its last step (preempted?); rerun to resume" >&2
      exit 3
    fi
  fi
  previous="$run_dir"
done
echo "pipeline: done: ${stages[*]} in $run_root" >&2
