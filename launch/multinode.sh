#!/usr/bin/env bash
# One node of a multi-node torchrun job (c10d rendezvous); run it on every node with its own NODE_RANK.
#
#   launch/multinode.sh HEAD[:PORT] NNODES NODE_RANK PROCS_PER_NODE [train.py key=value ...]
#
# HEAD is an address of node 0 that every node can reach (port 29500 unless given). Node 0 hosts the
# rendezvous store; torchrun then numbers the nodes itself, so NODE_RANK only says which node is the head.
# Environment: PYTHON (default .venv/bin/python, else python3), FLOTILLA_RDZV_ID (default flotilla: the same
# on every node of a job, a new one per job), FLOTILLA_RDZV_TIMEOUT (seconds to wait for every node, default
# 600), FLOTILLA_LOCAL_ADDR (this node's address for the others, when its host name does not resolve to it),
# FLOTILLA_DRY_RUN=1 (print the command, run nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/multinode.sh HEAD[:PORT] NNODES NODE_RANK PROCS_PER_NODE [train.py key=value ...]"

fail() {
  echo "multinode: error: $1" >&2
  echo "$usage" >&2
  exit 2
}

[ $# -ge 4 ] || fail "expected 4 arguments before the overrides, got $#: give the head node's address (node 0, e.g. 10.0.0.1 or 10.0.0.1:29500), the number of nodes, this node's rank and the processes per node"
head_addr=$1 nnodes=$2 node_rank=$3 nproc=$4
shift 4
case $head_addr in
  "" | -* | *=*) fail "'$head_addr' is not a head address: the first argument is node 0's host or IP (e.g. 10.0.0.1:29500)" ;;
esac
[[ $head_addr == *:* ]] || head_addr="$head_addr:29500"
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || fail "NNODES='$nnodes' is not a positive integer"
[[ $node_rank =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] || fail "NODE_RANK='$node_rank' must be an integer in 0..$((nnodes - 1))"
[[ $nproc =~ ^[1-9][0-9]*$ ]] || fail "PROCS_PER_NODE='$nproc' is not a positive integer"

source launch/common.sh
python=$(pick_python)
cmd=("$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend=c10d
     --rdzv-endpoint="$head_addr" --rdzv-id="${FLOTILLA_RDZV_ID:-flotilla}"
     --rdzv-conf="is_host=$([ "$node_rank" = 0 ] && echo 1 || echo 0),join_timeout=${FLOTILLA_RDZV_TIMEOUT:-600}")
[ -z "${FLOTILLA_LOCAL_ADDR:-}" ] || cmd+=(--local-addr="$FLOTILLA_LOCAL_ADDR")
cmd+=(train.py "$@")
echo "multinode: node $node_rank of $nnodes: $(quote "${cmd[@]}")"
[ "${FLOTILLA_DRY_RUN:-0}" = 1 ] && exit 0
exec "${cmd[@]}"
