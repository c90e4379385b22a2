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
set -euo pipefail
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
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
else  # no CUDA: N CPU ranks over gloo
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-${CPU_RANKS:-2}}"
fi
export TOKENIZERS_PARALLELISM=false
WORLD_SIZE_TOTAL=$((GPUS_PER_NODE * NNODES))

# launcher_args: the deepspeed launcher's own arguments for this node
launcher_args() {
  local args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE")
    if [[ "$NO_SSH" == 1 ]]; then args+=(--no_ssh --node_rank "$NODE_RANK"); fi
  elif [[ "$NNODES" -gt 1 ]]; then
    echo "launch: NNODES=$NNODES needs HOSTFILE (see launch/hostfile.example)" >&2; return 2
  else
    args+=(--num_gpus "$GPUS_PER_NODE")
  fi
  printf '%s\n' "${args[@]}"
}

# check_plan RECIPE [--set ...]: fail before launch (batch arithmetic, ZeRO-3 + MoE, EP divisibility, keys)
check_plan() {
  local recipe="$1"; shift
  "$PYTHON" -m pipeline.plan --recipe "$recipe" --ds-config "$DS_CONFIG" --world-size "$WORLD_SIZE_TOTAL" "$@"
}

# train RECIPE RUN_DIR [--set ...]: plan check, then the deepspeed launcher. SIGTERM/SIGUSR1 reaching this
# script are forwarded to the training ranks as SIGUSR1 (checkpoint at the next step, exit 0).
train() {
  local recipe="$1" run_dir="$2"; shift 2
  check_plan "$recipe" "$@" >/dev/null || { echo "launch: $recipe does not fit this launch (above)" >&2; return 2; }
  local largs; mapfile -t largs < <(launcher_args)
  echo "launch: $recipe -> $run_dir on $WORLD_SIZE_TOTAL ranks ($DS_CONFIG): deepspeed ${largs[*]}" >&2
  "$DEEPSPEED" "${largs[@]}" --module pipeline.train --recipe "$recipe" --ds-config "$DS_CONFIG" \
    --output-dir "$run_dir" --resume "$RESUME" "$@" &
  local pid=$!
  trap "forward_preemption $pid" TERM USR1
  local rc=0
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # still running: wait was interrupted by a trapped signal
  done
  trap - TERM USR1
  return "$rc"
}

forward_preemption() {  # SIGUSR1 to the ranks: the processes running pipeline.train under the launcher
  local launcher=$1 launch_pids pids=""
  launch_pids=$(pgrep -P "$launcher" | paste -sd, || true)  # deepspeed.launcher.launch (this node)
  [[ -n "$launch_pids" ]] && pids=$(pgrep -P "$launch_pids" || true)  # its children are the ranks
  echo "launch: preemption signal, asking ranks ${pids:-none} to checkpoint" >&2
  [[ -n "$pids" ]] && kill -USR1 $pids || true
}

# data_args STAGE_DATA_DIR EVAL_SPLIT TOKENIZER: --set items pointing a recipe at a data_prep folder
data_args() {
  local data="$1" eval_split="$2" tokenizer="$3"
  echo "--set"; echo "data.train=[{path: $data, split: train}]"
  echo "--set"; echo "data.eval={path: $data, split: $eval_split}"
  echo "--set"; echo "data.tokenizer=$tokenizer"
}
