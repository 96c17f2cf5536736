#!/usr/bin/env bash
# Installs ilbp with its test tools (scripts/setup.sh --test), then runs the linters
# and the whole test suite. This is what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
