#!/usr/bin/env bash
# The docs' plots, from real runs: DDP and DiLoCo (2 replicas x 1 stage, launch/single_node.sh) and a run with
# random SIGKILLs and in-memory recovery (launch/chaos.py, 2 replicas x 2 stages, a spare), all on the same
# 0.8M model and tokens; then bench/plots.py writes docs/loss_vs_tokens.png, docs/loss_vs_bytes.png and
# docs/recoveries.png, docs/goodput.png, docs/step_times.png and (from bench/churn.py's rows) docs/time_to_target.png.
#
#   bash bench/readme_plots.sh [RUNS_DIR]      (default runs/readme; it must not exist yet)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/readme}
if [ -e "$runs" ]; then
  echo "readme_plots: error: $runs exists: remove it or give another folder" >&2
  exit 2
fi
source launch/common.sh
python=$(pick_python)
export PYTHON=$python
common=(train.steps=150 train.batch_size=8 optim.warmup_steps=20 log.eval_every=25 log.eval_batches=4
        checkpoint.every=0)
launch/single_node.sh 2 parallel.replicas=2 parallel.stages=1 "${common[@]}" log.run_dir="$runs/ddp"
launch/single_node.sh 2 parallel.replicas=2 parallel.stages=1 "${common[@]}" sync.method=diloco sync.H=25 \
  log.run_dir="$runs/diloco-H25"
"$python" launch/chaos.py --replicas 2 --stages 2 --rate 40 --seed 1 --spares 1 --run-dir "$runs/ddp-2x2-chaos" \
  "${common[@]}"
"$python" bench/plots.py "$runs/ddp" "$runs/diloco-H25" "$runs/ddp-2x2-chaos" --out docs \
  --churn docs/churn.jsonl docs/churn_lowcomm.jsonl
