#!/usr/bin/env bash
# The whole pipeline on built-in data (`make demo` runs this after setting up .venv):
#   data_prep synth (shapes + sound world) -> data_prep tokenizer -> text_mlm -> vl_pretrain (EP=2, ZeRO-2)
#   -> VQA (classifier + generated answers) -> retrieval -> captioning (from the VQA run; generate + score)
#   -> vla_pretrain (adds audio; image and sound micro-batches mixed) -> audio retrieval fine-tuning
#   -> pipeline.evaluate of each -> export of the VQA run + pipeline.predict / pipeline.explain on held-out
#   images (DEMO_DIR/heldout, DEMO_DIR/explain) -> DEMO_DIR/metrics.json + a table.
# Without CUDA it runs on CPU_RANKS CPU ranks over gloo (default 2). Rerunning reuses finished steps:
# shards are skipped by data_prep, finished stages by their FINISHED marker, evaluations by their JSON.
# Environment: DEMO_DIR [runs/demo], DEMO_SAMPLES [synth images per task, 6000], DEMO_SOUNDS [synth training
# clips, 4000; the test split has 200 clips x 5 captions], DS_CONFIG
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
DEMO_SOUNDS="${DEMO_SOUNDS:-4000}"
DATA="$DEMO_DIR/data"
# cores for the one-process steps: nproc without the OMP_NUM_THREADS=1 that common.sh exports for CPU ranks
# (nproc reports OMP_NUM_THREADS when it is set)
CORES="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
TOKENIZER="$DEMO_DIR/tokenizer"
started=$SECONDS

step() { echo; echo "==> [$((SECONDS - started))s] $*" >&2; }
stop_if_preempted() {  # RUN_DIR: a stage that exited 0 without FINISHED was preempted (launch/README.md)
  if [[ ! -f "$1/FINISHED" ]]; then echo "demo: preempted in $1; rerun to resume" >&2; exit 0; fi
}

echo "demo: $DEMO_DIR, engine config $DS_CONFIG, $WORLD_SIZE_TOTAL ranks" >&2
step "data_prep synth -> $DATA"
# encoding workers: the shards are the same for any number (data_prep/writer.py)
"$PYTHON" -m data_prep synth --output "$DATA" --num-samples "$DEMO_SAMPLES" --num-sounds "$DEMO_SOUNDS" --seed 0 \
  --workers "$(( CORES < 4 ? CORES : 4 ))" --no-progress

step "data_prep tokenizer -> $TOKENIZER"
if [[ -f "$TOKENIZER/tokenizer.json" ]]; then
  echo "tokenizer exists, reusing" >&2
else
  "$PYTHON" -m data_prep tokenizer --shards "$DATA/captions" "$DATA/vqa" "$DATA/retrieval" "$DATA/sounds" \
    --vocab-size 1000 --output "$TOKENIZER"
fi

step "pretraining: text_mlm -> vl_pretrain (EP=2) in $DEMO_DIR"
# ITM is off in the demo's vl_pretrain: within this budget it stays at chance (itm_acc 0.5) while its three
# fused passes per sample take ~45% of the stage (BENCHMARKS.md); retrieval fine-tuning still trains ITM.
# One evaluation, at the end (time).
run_forwarding env STAGES="text_mlm vl_pretrain" SETS_vl_pretrain="${SETS_vl_pretrain:-objectives.itm=0 train.eval_every=0}" \
  bash launch/pipeline.sh "$DATA" "$TOKENIZER" "$DEMO_DIR"
stop_if_preempted "$DEMO_DIR/vl_pretrain"

finetune() {  # TASK EVAL_SPLIT [DATA FOLDER NAME] [INIT_FROM RUN NAME]
  local task="$1" split="$2" folder="$DATA/${3:-$1}" init="$DEMO_DIR/${4:-vl_pretrain}" run="$DEMO_DIR/$1"
  step "fine-tuning: $task from $(basename "$init") -> $run"
  if [[ -f "$run/FINISHED" ]]; then
    echo "$task already fine-tuned, reusing" >&2
  else
    run_forwarding env DATA="$folder" EVAL_SPLIT="$split" TOKENIZER="$TOKENIZER" \
      bash launch/finetune.sh "launch/recipes/$task.yaml" "$init" "$run"
    stop_if_preempted "$run"
  fi
  step "pipeline.evaluate: $task on $split"
  if [[ -f "$DEMO_DIR/eval/$task.json" && "$DEMO_DIR/eval/$task.json" -nt "$run/FINISHED" ]]; then
    echo "evaluation exists, reusing" >&2
  else
    OMP_NUM_THREADS="$CORES" "$PYTHON" -m pipeline.evaluate --checkpoint "$run" --task "$task" \
      --data "$folder" --split "$split" --output "$DEMO_DIR/eval/$task.json" --no-progress
  fi
}
finetune vqa val
finetune retrieval test
# captioning starts from the VQA run: its answer decoder has learned to name colours and shapes from the
# image, which captioning from vl_pretrain does not learn in this budget (BENCHMARKS.md, "Generation")
finetune captioning test retrieval vqa

step "pretraining: vla_pretrain (adds audio; image and sound micro-batches mixed) -> $DEMO_DIR/vla_pretrain"
if [[ -f "$DEMO_DIR/vla_pretrain/FINISHED" ]]; then
  echo "vla_pretrain already finished, reusing" >&2
else
  # ITM and ATM are off here, as ITM is in vl_pretrain (time); audio retrieval fine-tuning trains ATM
  vla_sets=()
  for item in ${SETS_vla_pretrain:-objectives.itm=0 objectives.atm=0}; do vla_sets+=(--set "$item"); done
  run_forwarding bash launch/finetune.sh launch/recipes/vla_pretrain.yaml "$DEMO_DIR/vl_pretrain" \
    "$DEMO_DIR/vla_pretrain" --set "data.tokenizer=$TOKENIZER" --set "data.eval={path: $DATA/sounds, split: test}" \
    --set "data.train=[{path: $DATA/captions, split: train, weight: 1.0}, {path: $DATA/sounds, split: train, weight: 3.0}]" \
    "${vla_sets[@]}"
  stop_if_preempted "$DEMO_DIR/vla_pretrain"
fi
finetune audio_retrieval test sounds vla_pretrain

# Use without DeepSpeed: export the VQA run, answer a few held-out questions, draw the experts' routing
step "export: $DEMO_DIR/vqa -> $DEMO_DIR/export/vqa; pipeline.predict and pipeline.explain on held-out images"
if [[ ! -f "$DEMO_DIR/export/vqa/config.json" || "$DEMO_DIR/vqa/FINISHED" -nt "$DEMO_DIR/export/vqa/config.json" ]]; then
  "$PYTHON" -m pipeline.export --checkpoint "$DEMO_DIR/vqa" --output "$DEMO_DIR/export/vqa"
fi
"$PYTHON" -m data_prep extract "$DATA/vqa" --split val --limit 4 --output "$DEMO_DIR/heldout"
"$PYTHON" -m pipeline.predict --model "$DEMO_DIR/export/vqa" --input "$DEMO_DIR/heldout/samples.jsonl" \
  --output "$DEMO_DIR/heldout/answers.jsonl" --top-k 3 --generate --no-progress
"$PYTHON" -m pipeline.explain --model "$DEMO_DIR/export/vqa" --image "$DEMO_DIR"/heldout/*.jpg \
  --output "$DEMO_DIR/explain"

step "results"
"$PYTHON" -m launch.demo_report --demo-dir "$DEMO_DIR"
echo "demo finished in $((SECONDS - started)) s" >&2
