#!/usr/bin/env bash
# Sets up a virtual environment from a clean clone and runs lint, type checks and the test suite.
# This is the README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# constraints.txt pins torch to the CPU wheel this kind of machine has on disk.
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
fi
exit "$status"
