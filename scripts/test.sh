#!/usr/bin/env bash
# The test command: set-up (a no-op when already installed), lint, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check secateur tests bench
python -m pytest -q "$@"
