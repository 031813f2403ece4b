# Sourced by tests/run.sh: postgres_pass_args ARGS... sets PG_ARGS to the PostgreSQL pass's pytest arguments: ARGS with
# the pass's own mark expression combined with the user's -m (the last one, as pytest takes it), not replaced by it.
postgres_pass_args() {
  local mark="registry_backend and not sqlite_only and not no_registry" user="" rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -m) [ $# -ge 2 ] || { echo "run.sh: -m needs a mark expression" >&2; return 2; }; user=$2; shift 2 ;;
      -m*) user=${1#-m}; shift ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  [ -z "$user" ] || mark="($user) and $mark"
  PG_ARGS=(-m "$mark" ${rest[@]+"${rest[@]}"})
}
