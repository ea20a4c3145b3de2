# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): flag parsing, quoting, and `run`,
# which prints every command as a copy-pasteable shell line ("+ cmd") and runs it unless
# --dry-run was given.

DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 2
}

# Shell-quotes each argument (the same output as Python's shlex.quote) and joins them.
quote() {
  local out=() w
  for w in "$@"; do
    if [[ -n $w && $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$w")
    else
      out+=("'${w//\'/\'\"\'\"\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# Quotes a path for a remote shell: a leading ~/ becomes "$HOME/..." so it expands there.
quote_remote_path() {
  local p=$1
  if [[ $p == "~" || $p == "~/"* ]]; then
    local rest=${p#"~"}
    rest=${rest//\\/\\\\}
    rest=${rest//\"/\\\"}
    rest=${rest//\$/\\\$}
    rest=${rest//\`/\\\`}
    printf '"$HOME%s"' "$rest"
  else
    quote "$p"
  fi
}

# run CMD ARGS...: print the command, then run it (not in dry-run mode).
run() {
  echo "+ $(quote "$@")"
  if ((!DRY_RUN)); then "$@"; fi
}

# run_sh 'shell text': for pipelines and `a || b`; printed as given, run with bash -c.
run_sh() {
  echo "+ $1"
  if ((!DRY_RUN)); then bash -c "$1"; fi
}

# capture VAR PLACEHOLDER CMD ARGS...: VAR=$(CMD ARGS...); in dry-run VAR=PLACEHOLDER.
capture() {
  local __var=$1 __placeholder=$2
  shift 2
  echo "+ $__var=\$($(quote "$@"))"
  if ((DRY_RUN)); then
    printf -v "$__var" '%s' "$__placeholder"
  else
    local __out
    __out=$("$@") || die "command failed: $(quote "$@")"
    printf -v "$__var" '%s' "$__out"
  fi
}

# take_flag "$@": reads `--some-flag=value` or `--some-flag value` into the variable SOME_FLAG
# and sets FLAG_SHIFT to the number of arguments used (1 or 2).
take_flag() {
  local name=${1%%=*} value
  if [[ $1 == *=* ]]; then
    value=${1#*=}
    FLAG_SHIFT=1
  elif (($# > 1)) && [[ $2 != --* ]]; then
    value=$2
    FLAG_SHIFT=2
  else
    die "$name needs a value ($name=VALUE)"
  fi
  local var=${name#--}
  var=${var//-/_}
  printf -v "${var^^}" '%s' "$value"
}

# require VALUE FLAG WHAT: a clear error when a required flag is missing.
require() {
  [[ -n $1 ]] || die "missing required flag $2 ($3); see --help"
}

# The jax version pinned in requirements.txt: accelerator wheels must match it exactly.
pinned_jax_version() {
  local req=$1/requirements.txt version
  version=$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$req" | head -n 1)
  [[ -n $version ]] || die "no 'jax==VERSION' line in $req"
  printf '%s' "$version"
}
