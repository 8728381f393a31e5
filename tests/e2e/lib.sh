# Shared helpers for tests/e2e/e2e-*.sh (source it after setting LORA and SRC).
#
#   run CMD...                     runs CMD; stdout -> $OUT (file $OUT_FILE), stderr -> $ERR, exit code -> $CODE
#   expect_exit CODE CMD...        runs CMD and checks its exit code
#   expect_stderr_contains TEXT    checks the last run's stderr (also: one line only)
#   expect_stdout_contains TEXT    checks the last run's stdout
#   json_query EXPR                evaluates a Python expression over j = the last run's stdout as JSON
#   expect_json EXPR WANT          checks json_query EXPR prints WANT
#   expect_eq WHAT GOT WANT        a named equality check
#   fail MESSAGE / pass            record one check; finish prints "N passed, M failed" and exits non-zero on failure
#
# Checks do not stop the script: every failure is printed, and finish decides.

PY=/usr/bin/python3
PASSED=0
FAILED=0
E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/lora-e2e.XXXXXX")
trap 'rm -rf "$E2E_TMP"' EXIT
OUT_FILE="$E2E_TMP/stdout"
ERR_FILE="$E2E_TMP/stderr"
LAST_CMD=""

fail() {
  FAILED=$((FAILED + 1))
  echo "FAIL: $*" >&2
  [ -n "$LAST_CMD" ] && echo "      after: $LAST_CMD" >&2
  return 0
}

pass() { PASSED=$((PASSED + 1)); }

run() {
  LAST_CMD="$*"
  "$@" >"$OUT_FILE" 2>"$ERR_FILE"
  CODE=$?
  OUT=$(cat "$OUT_FILE")
  ERR=$(cat "$ERR_FILE")
}

expect_exit() {
  local want=$1
  shift
  run "$@"
  if [ "$CODE" = "$want" ]; then pass; else fail "exit code $CODE, expected $want (stderr: $(head -c 300 "$ERR_FILE"))"; fi
}

expect_stderr_contains() {
  if [[ "$ERR" == *"$1"* ]]; then pass; else fail "stderr lacks \"$1\": $ERR"; fi
}

# An error is exactly one line on stderr.
expect_one_line_error() {
  local n
  n=$(wc -l <"$ERR_FILE")
  if [ "$n" = 1 ]; then pass; else fail "stderr has $n lines, expected 1: $ERR"; fi
}

expect_stdout_contains() {
  if [[ "$OUT" == *"$1"* ]]; then pass; else fail "stdout lacks \"$1\""; fi
}

# Prints the value of EXPR over j (the last stdout as JSON): strings raw,
# everything else as compact JSON. Prints "<error: ...>" when it cannot.
json_query() {
  "$PY" -c '
import json, sys
try:
    j = json.load(open(sys.argv[1]))
    v = eval(sys.argv[2])
    print(v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), sort_keys=True))
except Exception as e:
    print("<error: %s: %s>" % (type(e).__name__, e))
' "$OUT_FILE" "$1"
}

expect_json() {
  local got
  got=$(json_query "$1")
  if [ "$got" = "$2" ]; then pass; else fail "json $1 = $got, expected $2"; fi
}

expect_eq() {
  if [ "$2" = "$3" ]; then pass; else fail "$1: got $2, expected $3"; fi
}

# expect_nothing_left NAME: nothing named NAME or NAME.tmp-* in the folder $W
# (an output and its temp files after a failed command).
expect_nothing_left() {
  local left
  left=$(cd "$W" && ls -d "$1" "$1".tmp-* 2>/dev/null)
  if [ -z "$left" ]; then pass; else fail "left behind after failure: $left"; fi
}

finish() {
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
  exit $?
}
