#!/usr/bin/env bash
# The whole pipeline on built-in data (`make demo` runs this after setting up .venv):
#   data_prep synth -> data_prep tokenizer -> text_mlm -> vl_pretrain (EP=2, ZeRO-2)
#   -> VQA and retrieval fine-tuning -> pipeline.evaluate -> DEMO_DIR/metrics.json + a table.
# Without CUDA it runs on CPU_RANKS CPU ranks over gloo (default 2). Rerunning reuses finished steps:
# shards are skipped by data_prep, finished stages by their FINISHED marker, evaluations by their JSON.
# Environment: DEMO_DIR [runs/demo], DEMO_SAMPLES [synth images per task, 6000], DS_CONFIG
# [ds_configs/zero2_bf16.json on CUDA; ds_configs/zero2_fp32.json on every CPU, AMX included: bf16 measured
# 1.7x slower there (pipeline.run.hardware, BENCHMARKS.md)], and everything
# launch/common.sh reads (GPUS_PER_NODE, CPU_RANKS, ...).
if [[ -z "${DS_CONFIG:-}" ]]; then
  _py="${PYTHON:-.venv/bin/python}"
  DS_CONFIG="ds_configs/zero2_$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && "$_py" -m pipeline.run.hardware).json"
  export DS_CONFIG
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEMO_SAMPLES="${DEMO_SAMPLES:-6000}"
DATA="$DEMO_DIR/data"
TOKENIZER="$DEMO_DIR/tokenizer"
started=$SECONDS

step() { echo; echo "==> [$((SECONDS - started))s] $*" >&2; }
stop_if_preempted() {  # RUN_DIR: a stage that exited 0 without FINISHED was preempted (launch/README.md)
  if [[ ! -f "$1/FINISHED" ]]; then echo "demo: preempted in $1; rerun to resume" >&2; exit 0; fi
}

echo "demo: $DEMO_DIR, engine config $DS_CONFIG, $WORLD_SIZE_TOTAL ranks" >&2
step "data_prep synth -> $DATA"
# --num-sounds 0: no demo stage reads the sound world yet (its audio tasks come with issue 18)
"$PYTHON" -m data_prep synth --output "$DATA" --num-samples "$DEMO_SAMPLES" --num-sounds 0 --seed 0 --no-progress

step "data_prep tokenizer -> $TOKENIZER"
if [[ -f "$TOKENIZER/tokenizer.json" ]]; then
  echo "tokenizer exists, reusing" >&2
else
  "$PYTHON" -m data_prep tokenizer --shards "$DATA/captions" "$DATA/vqa" "$DATA/retrieval" \
    --vocab-size 1000 --output "$TOKENIZER"
fi

step "pretraining: text_mlm -> vl_pretrain (EP=2) in $DEMO_DIR"
# ITM is off in the demo's vl_pretrain: within this budget it stays at chance (itm_acc 0.5) while its three
# fused passes per sample take ~45% of the stage (BENCHMARKS.md); retrieval fine-tuning still trains ITM.
run_forwarding env STAGES="text_mlm vl_pretrain" SETS_vl_pretrain="${SETS_vl_pretrain:-objectives.itm=0}" \
  bash launch/pipeline.sh "$DATA" "$TOKENIZER" "$DEMO_DIR"
stop_if_preempted "$DEMO_DIR/vl_pretrain"

finetune() {  # TASK EVAL_SPLIT
  local task="$1" split="$2" run="$DEMO_DIR/$1"
  step "fine-tuning: $task from vl_pretrain -> $run"
  if [[ -f "$run/FINISHED" ]]; then
    echo "$task already fine-tuned, reusing" >&2
  else
    run_forwarding env DATA="$DATA/$task" EVAL_SPLIT="$split" TOKENIZER="$TOKENIZER" \
      bash launch/finetune.sh "launch/recipes/$task.yaml" "$DEMO_DIR/vl_pretrain" "$run"
    stop_if_preempted "$run"
  fi
  step "pipeline.evaluate: $task on $split"
  if [[ -f "$DEMO_DIR/eval/$task.json" && "$DEMO_DIR/eval/$task.json" -nt "$run/FINISHED" ]]; then
    echo "evaluation exists, reusing" >&2
  else
    OMP_NUM_THREADS="$(nproc)" "$PYTHON" -m pipeline.evaluate --checkpoint "$run" --task "$task" \
      --data "$DATA/$task" --split "$split" --output "$DEMO_DIR/eval/$task.json" --no-progress
  fi
}
finetune vqa val
finetune retrieval test

step "results"
"$PYTHON" -m launch.demo_report --demo-dir "$DEMO_DIR"
echo "demo finished in $((SECONDS - started)) s" >&2
