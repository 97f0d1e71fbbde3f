# Shared by the launch scripts (sourced, not run): errors, shell quoting, dry-run execution and flag values.
# The sourcing script sets PROG (its name in messages), ARGS (its arguments), i (the index being read) and
# ARG (the flag being read), and DRY_RUN for run_cmd.

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Quote one word for a POSIX shell, leaving plain words bare so that dry-run output stays readable and can
# be pasted back into a shell.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9.-]+=)(.+)$ ]]; then  # --flag='value', same word, easier to read
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    local sq="'" esc="'\\''"
    printf "'%s'" "${s//$sq/$esc}"
  fi
}

# Print a command (quoted, one line), then run it unless DRY_RUN=1.
run_cmd() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s\n' "$out"
  if ((${DRY_RUN:-0} == 0)); then "$@"; fi
}

# The value of the flag in $ARG into VAL: '--flag=value' or the next word of ARGS (not a flag).
take_value() {
  if [[ $ARG == *=* ]]; then
    VAL=${ARG#*=}
  else
    i=$((i + 1))
    ((i < ${#ARGS[@]})) || die "$1 needs a value"
    VAL=${ARGS[$i]}
    [[ $VAL != --* ]] || die "$1 needs a value (got '$VAL')"
  fi
  [[ -n $VAL ]] || die "$1 needs a non-empty value"
}
