# Shared by launch/*.sh (sourced). Environment (defaults in brackets):
#   GPUS_PER_NODE  ranks per node [CUDA GPU count; without CUDA: CPU_RANKS]
#   CPU_RANKS      CPU ranks (gloo) when there is no CUDA [2]
#   NNODES         nodes [1]; >1 needs HOSTFILE (pdsh) or NO_SSH=1 with NODE_RANK on each node
#   NODE_RANK      this node's rank with NO_SSH=1 [0]
#   HOSTFILE       deepspeed hostfile ("host slots=N" lines) [none: local node]
#   NO_SSH         1 = launch this node only (run the script on every node) [0]
#   MASTER_ADDR    [127.0.0.1]   MASTER_PORT [29500]
#   DS_CONFIG      engine JSON [ds_configs/zero2_bf16.json]
#   PYTHON         interpreter [.venv/bin/python if present, else python3]
#   RESUME         auto|never [auto]
#   PREEMPT_GRACE_S  after a stop signal, seconds the ranks get to checkpoint before every process is
#                  killed [180] (pipeline.launch_guard)
#   LAUNCH_PREEMPTED_MARKER  file to which a preempted run appends "RUN_DIR TAG" (launch/slurm.sbatch)
#   LAUNCH_CUDA_DEVICES  CUDA devices of this node [probed with torch once, then exported to child scripts]
set -euo pipefail
# A stop signal (Ctrl-C, SIGTERM, SIGUSR1) before the launcher starts: launch nothing, exit 0 (see train)
STOP_REQUESTED=0
PREEMPTED=0
trap 'STOP_REQUESTED=1' TERM INT USR1
die() { echo "launch: $*" >&2; exit 2; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEEPSPEED="$(dirname "$PYTHON")/deepspeed"
[[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero2_bf16.json}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NO_SSH="${NO_SSH:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RESUME="${RESUME:-auto}"
PREEMPT_GRACE_S="${PREEMPT_GRACE_S:-180}"
if [[ -z "${LAUNCH_CUDA_DEVICES:-}" ]]; then  # probed once (a torch import): the scripts a script starts inherit it
  _probe='import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'
  LAUNCH_CUDA_DEVICES="$("$PYTHON" -c "$_probe" 2>/dev/null || echo 0)"
  export LAUNCH_CUDA_DEVICES
fi
[[ "$LAUNCH_CUDA_DEVICES" =~ ^[0-9]+$ ]] || die "LAUNCH_CUDA_DEVICES=$LAUNCH_CUDA_DEVICES: expected a whole number >= 0"
if [[ "$LAUNCH_CUDA_DEVICES" -gt 0 ]]; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-$LAUNCH_CUDA_DEVICES}"
else  # no CUDA: N CPU ranks over gloo
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-${CPU_RANKS:-2}}"
fi
export TOKENIZERS_PARALLELISM=false

# every setting is checked here, before anything runs: a wrong one stops the launch with exit 2
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_count "$NNODES" || die "NNODES=$NNODES: expected a whole number >= 1"
is_count "$GPUS_PER_NODE" || die "GPUS_PER_NODE=$GPUS_PER_NODE (or CPU_RANKS): expected a whole number >= 1"
[[ "$NO_SSH" == 0 || "$NO_SSH" == 1 ]] || die "NO_SSH=$NO_SSH: expected 0 or 1"
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK: expected 0..$((NNODES - 1))"
[[ "$RESUME" == auto || "$RESUME" == never ]] || die "RESUME=$RESUME: expected auto or never"
[[ "$PREEMPT_GRACE_S" =~ ^[0-9]+([.][0-9]+)?$ && "$PREEMPT_GRACE_S" != 0 ]] \
  || die "PREEMPT_GRACE_S=$PREEMPT_GRACE_S: expected seconds > 0"
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG=$DS_CONFIG: file not found (ds_configs/ has: $(ls ds_configs | paste -sd' '))"
WORLD_SIZE_TOTAL=$((GPUS_PER_NODE * NNODES))
# the deepspeed launcher's own arguments for this node
LAUNCHER_ARGS=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: file not found (format: launch/hostfile.example)"
  LAUNCHER_ARGS+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE")
  if [[ "$NO_SSH" == 1 ]]; then LAUNCHER_ARGS+=(--no_ssh --node_rank "$NODE_RANK"); fi
elif [[ "$NNODES" -gt 1 ]]; then
  die "NNODES=$NNODES needs HOSTFILE (see launch/hostfile.example)"
else
  LAUNCHER_ARGS+=(--num_gpus "$GPUS_PER_NODE")
fi

# check_plan RECIPE [--set ...]: fail before launch (batch arithmetic, ZeRO-3 + MoE, EP divisibility, keys)
check_plan() {
  local recipe="$1"; shift
  "$PYTHON" -m pipeline.plan --recipe "$recipe" --ds-config "$DS_CONFIG" --world-size "$WORLD_SIZE_TOTAL" "$@"
}

# run_forwarding CMD...: run CMD in the background and wait for it, forwarding SIGTERM/SIGINT/SIGUSR1 to it
# as SIGUSR1 (launch/*.sh and pipeline.launch_guard treat the three alike); returns CMD's exit status.
# Needed where only this shell is signalled (PID 1 of a container, SLURM's --signal=B:...).
run_forwarding() {
  "$@" &
  local pid=$! rc=0
  trap "STOP_REQUESTED=1; kill -USR1 $pid 2>/dev/null || true" TERM INT USR1
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trapped signal interrupts wait
  wait "$pid" && rc=0 || rc=$?
  trap 'STOP_REQUESTED=1' TERM INT USR1
  return "$rc"
}

# train RECIPE RUN_DIR [--set ...]: plan check, then the deepspeed launcher under pipeline.launch_guard.
# A stop signal makes every rank checkpoint at its next step boundary (or finish the checkpoint it is
# writing) and exit 0; no process outlives the launch (launch/README.md "Stopping and preemption").
train() {
  local recipe="$1" run_dir="$2"; shift 2
  [[ -f "$recipe" ]] || die "recipe $recipe: file not found (launch/recipes/ has: $(ls launch/recipes | paste -sd' '))"
  if ! check_plan "$recipe" "$@" >/dev/null && [[ "$STOP_REQUESTED" == 0 ]]; then
    die "$recipe does not fit this launch (above)"
  fi
  if [[ "$STOP_REQUESTED" == 1 ]]; then  # (a group-wide signal also stops the plan check)
    echo "launch: stop requested before $recipe started: nothing launched, rerun to start" >&2
    note_preempted "$run_dir" none; return 0
  fi
  echo "launch: $recipe -> $run_dir on $WORLD_SIZE_TOTAL ranks ($DS_CONFIG): deepspeed ${LAUNCHER_ARGS[*]}" >&2
  local rc=0
  run_forwarding "$PYTHON" -m pipeline.launch_guard --grace-period "$PREEMPT_GRACE_S" -- \
    "$DEEPSPEED" "${LAUNCHER_ARGS[@]}" --module pipeline.train --recipe "$recipe" --ds-config "$DS_CONFIG" \
    --output-dir "$run_dir" --resume "$RESUME" "$@" || rc=$?
  if [[ "$rc" == 0 ]]; then
    local latest finished=""
    latest="$(latest_checkpoint "$run_dir")"
    [[ -f "$run_dir/FINISHED" ]] && finished="$(<"$run_dir/FINISHED")"
    if [[ -n "$latest" && "$latest" != "$finished" ]]; then  # pipeline.train stopped before its last step
      echo "launch: preempted at step $((10#${latest#step_})) ($run_dir/checkpoints/$latest), rerun to resume" >&2
      note_preempted "$run_dir" "$latest"
    fi
  fi
  return "$rc"
}

note_preempted() {  # RUN_DIR TAG
  PREEMPTED=1
  if [[ -n "${LAUNCH_PREEMPTED_MARKER:-}" ]]; then echo "$1 $2" >> "$LAUNCH_PREEMPTED_MARKER"; fi
}

latest_checkpoint() {  # RUN_DIR -> tag of its newest complete checkpoint (step_N), or nothing
  "$PYTHON" -c 'import sys; from pipeline.run.run_dir import RunDir; print(RunDir(sys.argv[1]).latest() or "")' "$1"
}

# data_sets STAGE_DATA_DIR EVAL_SPLIT TOKENIZER: DATA_SETS = the --set items pointing a recipe at a
# data_prep folder (an array, not printed: a failure inside $(...) or <(...) would not stop the script)
data_sets() {
  local data="$1" eval_split="$2" tokenizer="$3"
  [[ -d "$data" ]] || die "DATA=$data: not a folder (expected a data_prep output folder with manifest.json)"
  [[ -n "$tokenizer" ]] || die "DATA=$data needs TOKENIZER (a data_prep tokenizer folder)"
  DATA_SETS=(--set "data.train=[{path: $data, split: train}]" --set "data.eval={path: $data, split: $eval_split}"
             --set "data.tokenizer=$tokenizer")
}
