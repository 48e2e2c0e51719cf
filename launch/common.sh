# Sourced by the launch scripts (from the repository root).

# The Python to run: $PYTHON, else the set-up's .venv/bin/python, else python3.
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; elif [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

# Print a command as one line that a shell runs as is (arguments with characters outside a plain set are
# single-quoted), the same on every bash version.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[[:alnum:]_./:=,+@%-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
