#!/usr/bin/env bash
# Set up and run every check: lint and format (ruff), types (mypy), then the whole test suite.
# The tests start their own embedded services (broker and graph DB) on free ports and stop them
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
exec python -m pytest -q "$@"
