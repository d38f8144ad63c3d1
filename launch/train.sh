#!/usr/bin/env bash
# Train with the DeepSpeed launcher: on this node, or on the hosts of a hostfile.
#   launch/train.sh CONFIG [key=value ...]            all visible GPUs
#   launch/train.sh --gpus 4 CONFIG [key=value ...]   the first 4 GPUs
#   launch/train.sh --cpu 2 CONFIG [key=value ...]    2 CPU ranks (gloo), no GPU needed
#   launch/train.sh --hostfile HOSTS CONFIG ...       every host of HOSTS (`host slots=N` lines),
#                                                     started over ssh (pdsh); with --cpu N: N CPU
#                                                     ranks on each host
# A pipeline (a YAML file with a top-level `stages:`) runs all its stages in one launch.
# The config is validated before any rank starts, so a typo fails in seconds. MASTER_PORT picks
# the rendezvous port; unset, a free one is chosen, so two launches on one node do not collide.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cpu=0
gpus=""
hostfile=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) cpu=${2:?--cpu needs a number}; shift 2 ;;
    --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
    --hostfile) hostfile=${2:?--hostfile needs a file}; shift 2 ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
PYTHON=${PYTHON:-python}
command=train
if grep -q '^stages:' "$1" 2>/dev/null; then command=pipeline; fi

"$PYTHON" -m mmtrain.cli config "$@" > /dev/null

export PYTHONUNBUFFERED=1
args=()
# a port free here now: two jobs on one node each get their own
port=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
if (( cpu > 0 )); then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
  [[ -n $hostfile ]] || args+=(--num_gpus "$cpu")
elif [[ -n "$gpus" ]]; then
  args+=(--num_gpus "$gpus")
fi
hosts=""
if [[ -n $hostfile ]]; then
  [[ -f $hostfile ]] || { echo "launch/train.sh: no hostfile $hostfile" >&2; exit 2; }
  command -v pdsh >/dev/null || { echo "launch/train.sh: --hostfile starts the ranks with pdsh, which is not installed" >&2; exit 2; }
  if (( cpu > 0 )); then   # N CPU ranks a host, whatever the hostfile's slots
    tmp_hosts=$(mktemp); awk -v n="$cpu" 'NF && $1 !~ /^#/ {print $1, "slots=" n}' "$hostfile" > "$tmp_hosts"
    hostfile=$tmp_hosts
  fi
  hosts=$(awk 'NF && $1 !~ /^#/ {print $1}' "$hostfile" | paste -sd, -)
  # what the ranks on the other hosts must see of this environment (pdsh starts them in a fresh
  # login shell): DeepSpeed reads `export`s from the file DS_ENV_FILE names
  DS_ENV_FILE=$(mktemp)
  env | grep -E '^(DS_ACCELERATOR|CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|LD_LIBRARY_PATH|(HF|TRANSFORMERS|TOKENIZERS|GLOO|NCCL|TORCH|TRITON|MMTRAIN)_[A-Za-z0-9_]*)=' \
    | grep -v '^CUDA_VISIBLE_DEVICES=$' > "$DS_ENV_FILE" || true
  export DS_ENV_FILE
  args+=(--hostfile "$hostfile" --launcher pdsh)
fi

# The launcher runs in its own process group. A SIGTERM/SIGINT/SIGUSR1 to this script (kill, a job
# manager, a container stop, Ctrl-C) reaches the ranks as SIGUSR1: they finish the step, checkpoint
# and exit 85 (requeue), and this script exits with their code. Without this, the deepspeed
# launcher exits at once on SIGTERM and its ranks train on, orphaned. A second signal stops
# everything at once.
setsid "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --master_port "$port" \
  --no_local_rank --module mmtrain.cli "$command" "$@" &
launcher=$!
# A SIGKILL to this script (an OOM kill, a job manager) cannot be trapped: a watcher outside it sees
# the script gone and sends SIGTERM to the launcher's group, the ranks included (they checkpoint at
# their next step and exit). Each rank also dies with its own launcher (engine/signals.py).
# (its parent changes the moment the script dies, reaped or not: a killed, unreaped script still
# answers `kill -0`)
(
  trap '' TERM INT USR1
  me=$BASHPID
  parent() { ps -o ppid= -p "$me" | tr -d ' '; }
  while [[ $(parent) == "$$" ]] && kill -0 "$launcher" 2>/dev/null; do sleep 1; done
  [[ $(parent) == "$$" ]] || kill -TERM -- "-$launcher" 2>/dev/null
) </dev/null >/dev/null 2>&1 &
watcher=$!
signalled=0
# shellcheck disable=SC2317,SC2329  # invoked by the trap below
forward() {
  if (( signalled )); then
    kill -TERM -- "-$launcher" 2>/dev/null || true
  else
    signalled=1
    echo "launch/train.sh: stop signal: the ranks checkpoint and exit (a second signal stops them at once)" >&2
    if [[ -n $hosts ]]; then   # on every host, the ranks of this launch: the children of its launch.py
      pdsh -R ssh -w "$hosts" "for p in \$(pgrep -f 'deepspeed.launcher.launch .*--master_port=$port'); do pkill -USR1 -P \$p; done" || true
    else
      pkill -USR1 -g "$launcher" -f " -m mmtrain[.]cli (train|pipeline)" || true   # the ranks, not the launcher
    fi
  fi
}
trap forward TERM INT USR1
while :; do
  rc=0
  wait "$launcher" || rc=$?
  # a trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait again
  (( rc > 128 )) && kill -0 "$launcher" 2>/dev/null && continue
  break
done
if (( rc > 128 )); then         # it ended just as the signal came: its own status is still there
  r=0
  wait "$launcher" 2>/dev/null || r=$?
  if (( r != 127 )); then rc=$r; fi
fi
kill -KILL "$watcher" 2>/dev/null || true
rm -f "${DS_ENV_FILE:-}" "${tmp_hosts:-}"
exit "$rc"
