# Sourced by the launch scripts: print a command as one line that a shell runs as is (arguments with characters
# outside a plain set are single-quoted), the same on every bash version.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[[:alnum:]_./:=,+@%-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
