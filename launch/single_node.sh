#!/usr/bin/env bash
# Every process of the job on this machine: torchrun --standalone (its own rendezvous on a free port).
#
#   launch/single_node.sh PROCS [train.py key=value ...]
#
# PROCS must equal parallel.replicas x parallel.stages (4 for configs/default.yaml).
# Environment: PYTHON (default .venv/bin/python, else python3), FLOTILLA_DRY_RUN=1 (print the command, run nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [[ ${1:-} =~ ^[1-9][0-9]*$ ]]; then
  echo "single_node: error: the first argument is the number of processes (parallel.replicas x parallel.stages, 4 for the default config), got '${1:-}'" >&2
  echo "usage: launch/single_node.sh PROCS [train.py key=value ...]" >&2
  exit 2
fi
nproc=$1
shift
source launch/common.sh
python=$(pick_python)
cmd=("$python" -m torch.distributed.run --standalone --nproc-per-node="$nproc" train.py "$@")
echo "single_node: $(quote "${cmd[@]}")"
[ "${FLOTILLA_DRY_RUN:-0}" = 1 ] && exit 0
exec "${cmd[@]}"
