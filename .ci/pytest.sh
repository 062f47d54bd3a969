#!/usr/bin/env bash
# Runs the test suite with the given python; pytest's exit code 5 ("no tests
# collected") is a failure here, never a silent pass.
set -u
py="$1"; shift
"$py" -m pytest -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
