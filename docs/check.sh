#!/usr/bin/env bash
# Run every command quoted in README.md and docs/*.md, shrunk so the whole check takes a few minutes on 2 cores.
#
#   bash docs/check.sh            run them all (from any folder; works in the repository root)
#   bash docs/check.sh --list     print each command and the rule it falls under, run nothing
#   bash docs/check.sh REGEX      only the commands matching REGEX
#
# The commands are not listed here: they are read from the ```bash blocks of the pages (lines ending in a
# backslash are joined; comment lines and trailing "# ..." comments dropped; a command quoted on several pages
# runs once). Each command then takes the first rule below whose regex matches it. A command that no rule matches
# fails the check: a new command in the docs needs a rule here (usually the catch-all `tiny` ones already fit).
#
# Actions (comma-separated ones run in order):
#   tiny          run it with the TINY overrides appended (a 2-step run of a tiny model in a fresh log.run_dir)
#   sub:A=>B      replace every match of regex A by B in the command (B may use \1, {TINY}, {RUN}, {WORK})
#   dry           run it with FLOTILLA_DRY_RUN=1 (the launch scripts print their command and stop)
#   config        check its key=value overrides with `train.py --print-config` (every start-up check, no process)
#   help          run each `.venv/bin/python SCRIPT` / `.venv/bin/python -m MODULE` in it with --help only
#   replace:CMD   run CMD instead
#   gpu           run it as is when nvidia-smi sees a GPU, else skip
#   run           run it as it is (after any sub)
#   skip          do not run it
# The reason is printed with the result, so what was not run, and why, is on the screen.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flotilla-docs-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TINY="train.steps=2 model.dim=32 model.n_layers=4 model.n_heads=4 model.n_kv_heads=1 data.seq_len=32 \
train.batch_size=4 parallel.microbatches=2 optim.warmup_steps=1 log.log_every=1 log.eval_every=2 log.eval_batches=1 \
checkpoint.every=0 log.tensorboard=false train.threads=1 parallel.sp_cost=$WORK/sp_cost.json"
TIMEOUT=${CHECK_TIMEOUT:-300}  # seconds per command

# regex <TAB> action(s) <TAB> reason; first match wins
RULES=$(cat <<'EOF'
^bash launch/setup\.sh && \.venv/bin/python -m pytest -q$	replace:bash launch/setup.sh && .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_docs.py && .venv/bin/python -m pytest -q -p no:cacheprovider --collect-only >/dev/null	the suite takes 12-16 min: every test is collected, only tests/test_docs.py runs
^TORCH_SPEC=	config	installs a CUDA torch and needs GPU nodes: the overrides are checked only
^bash bench/gpu_check\.sh	gpu	needs a GPU
launch/chaos\.py --random	help	five runs of 5000 steps with 15 faults each take hours
launch/chaos\.py 	sub:--run-dir \S+=>--run-dir {RUN},tiny	one machine: coordinator, workers and a spare, 2 steps
^launch/multinode\.sh 127\.0\.0\.1	sub:train\.steps=20=>{TINY} log.run_dir={RUN},run	two loopback "nodes", 2 steps
^launch/multinode\.sh 	sub:\$NODE_RANK=>0,dry,config	needs several machines: dry run and config check
sbatch 	config	needs a SLURM cluster (tests/test_launch.py runs the script with stand-ins): config check only
^export FLOTILLA_SECRET=	skip	sets the run's secret for the commands after it
-m recovery\.coordinator	sub:^mkdir -p \S+ && =>,help	the coordinator serves until its job ends (workers on other machines)
^mkdir -p 	skip	prepares a folder on the cluster
-m launch\.node_agent	help,config	keeps workers running until the job ends (needs a coordinator): help and config check
^FLOTILLA_SECRET=\S* \.venv/bin/python train\.py 	config	a spot worker needs a running coordinator: config check only
wan\.site=1 	sub:'wan\.initial_peers=\[[^]]*\]'=>,config	needs two sites (tests/test_wan.py runs two on loopback); site 0's address is known only when it runs
sync\.transport=hivemind	config	needs two sites (tests/test_wan.py runs two on loopback): config check only
^bash bench/readme_plots\.sh	replace:.venv/bin/python bench/plots.py --help	trains three runs (about 6 min): bench/plots.py --help only
bench/profile_sp\.py( --lanes [0-9]+)? && \.venv/bin/torchrun 	sub:bench/profile_sp\.py( --lanes [0-9]+)?=>bench/profile_sp.py\1 --tokens-per-lane 512 --out {WORK}/sp_cost.json,tiny	the cost model fitted on short sequences, then 2 steps
^\.venv/bin/python bench/profile_sp\.py && 	help	fits the cost model and measures four SP plans (minutes)
^\.venv/bin/python bench/profile_sp\.py	sub:bench/profile_sp\.py=>bench/profile_sp.py --tokens-per-lane 512 --out {WORK}/sp_cost.json,run	the cost model fitted on short sequences
^\.venv/bin/python bench/	help	a benchmark (minutes to hours): --help only
-m recovery\.export runs/default/checkpoints/step_00000300 exported/	sub:^.*$=>.venv/bin/python train.py parallel.replicas=1 parallel.stages=1 {TINY} log.run_dir={RUN} && .venv/bin/python -m recovery.export {RUN}/checkpoints/step_00000002 {WORK}/exported,run	a 2-step run of a tiny model, then its checkpoint exported
^\.venv/bin/tensorboard 	replace:.venv/bin/tensorboard --version_tb	starts a server: its version only
train\.py --(help|print-config)	run	prints and exits
^(bash launch/setup\.sh && )?\.venv/bin/torchrun .*train\.py	tiny	2 steps of a tiny model
^\.venv/bin/python train\.py	tiny	2 steps of a tiny model
^launch/single_node\.sh 	tiny	2 steps of a tiny model
EOF
)

# The commands, "page:line<TAB>command" one a line, in page order (README first).
commands() {
  "$PY" - README.md docs/*.md <<'EOF'
import re, sys

def strip_comment(line):
    """Drop a trailing `# ...` outside quotes (a `#` that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()

seen = set()
for page in sys.argv[1:]:
    lines = open(page, encoding="utf-8").read().split("\n")
    in_bash, cmd, start = False, "", 0
    for n, raw in enumerate(lines, 1):
        if not in_bash:
            in_bash = raw.strip() == "```bash"
            continue
        if raw.strip() == "```":
            in_bash = False
            continue
        line = strip_comment(raw)
        if not cmd:
            start = n
        if line.endswith("\\"):
            cmd += line[:-1].rstrip() + " "
            continue
        cmd = re.sub(r"\s+", " ", (cmd + line).strip())
        if cmd and cmd not in seen:
            seen.add(cmd)
            print(f"{page}:{start}\t{cmd}")
        cmd = ""
EOF
}

# The key=value overrides of a command (train.py's, wherever they are passed on), shell-quoted on one line.
overrides() {
  "$PY" -c 'import re, shlex, sys
print(" ".join(shlex.quote(w) for w in shlex.split(sys.argv[1]) if re.match(r"(config|[a-z_]+\.[a-z_0-9]+)=", w)))' "$1"
}

# Run one shell command line with the per-command timeout; its output goes to $WORK/log.
attempt() {
  timeout "$TIMEOUT" bash -c "$1" </dev/null >>"$WORK/log" 2>&1
}

list=0 filter=""
[ "${1:-}" = --list ] && { list=1; shift; }
filter=${1:-}
pass=0 fail=0 skipped=0 n=0
while IFS=$'\t' read -r where cmd; do
  [ -n "$filter" ] && ! [[ $cmd =~ $filter ]] && continue
  rule="" actions="" reason=""
  while IFS=$'\t' read -r re act why; do
    [ -z "$re" ] && continue
    if [[ $cmd =~ $re ]]; then rule=$re actions=$act reason=$why; break; fi
  done <<<"$RULES"
  n=$((n + 1))
  if [ -z "$rule" ]; then
    echo "FAIL  $where: no rule in docs/check.sh matches: $cmd"
    fail=$((fail + 1))
    continue
  fi
  run_dir="$WORK/run-$n"
  line=$cmd ok=1 ran=0
  : >"$WORK/log"
  IFS=, read -ra steps <<<"$actions"
  # a sub:/replace: argument may itself hold commas only after its "=>"; rejoin pieces that do not name an action
  joined=() for_step=""
  for s in "${steps[@]}"; do
    if [[ $s =~ ^(tiny|dry|config|help|gpu|skip|run|sub:|replace:) ]]; then
      [ -n "$for_step" ] && joined+=("$for_step")
      for_step=$s
    else
      for_step="$for_step,$s"
    fi
  done
  [ -n "$for_step" ] && joined+=("$for_step")
  names=$(for s in "${joined[@]}"; do printf '%s,' "${s%%:*}"; done)
  names=${names%,}
  if [ $list = 1 ]; then
    printf '%s\n      %s  [%s: %s]\n' "$where" "$cmd" "$names" "$reason"
    continue
  fi
  for step in "${joined[@]}"; do
    case $step in
      sub:*)
        spec=${step#sub:} from=${spec%%=>*} to=${spec#*=>}
        to=${to//\{TINY\}/$TINY} to=${to//\{RUN\}/$run_dir} to=${to//\{WORK\}/$WORK}
        line=$("$PY" -c 'import re, sys; print(re.sub(sys.argv[2], sys.argv[3], sys.argv[1]))' "$line" "$from" "$to")
        ;;
      tiny) ran=1; attempt "$line $TINY log.run_dir=$run_dir" || ok=0 ;;
      run) ran=1; attempt "$line" || ok=0 ;;
      dry) ran=1; attempt "FLOTILLA_DRY_RUN=1 $line" || ok=0 ;;
      config) ran=1; attempt "$PY train.py --print-config $(overrides "$line") >/dev/null" || ok=0 ;;
      help)
        ran=1
        mapfile -t progs < <(grep -oE '\.venv/bin/python (-m [A-Za-z_.]+|[^ ]+\.py)' <<<"$line")
        for p in "${progs[@]}"; do attempt "$p --help >/dev/null" || ok=0; done
        ;;
      replace:*) ran=1; attempt "${step#replace:}" || ok=0 ;;
      gpu)
        if nvidia-smi -L >/dev/null 2>&1; then ran=1; attempt "$line" || ok=0; fi
        ;;
      skip) ;;
    esac
    [ $ok = 1 ] || break
  done
  if [ $ok = 0 ]; then
    echo "FAIL  $where: $cmd"
    echo "      ran: $line  ($reason)"
    tail -n 15 "$WORK/log" | sed 's/^/      | /'
    fail=$((fail + 1))
  elif [ $ran = 0 ]; then
    echo "SKIP  $where: $cmd"
    echo "      ($reason)"
    skipped=$((skipped + 1))
  else
    echo "ok    $where: $cmd  [$names: $reason]"
    pass=$((pass + 1))
  fi
done < <(commands)
[ $list = 1 ] && exit 0
echo "docs/check.sh: $pass passed, $skipped skipped, $fail failed"
[ $fail = 0 ]
