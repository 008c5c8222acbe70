#!/usr/bin/env bash
# The test command: set-up (a no-op when already installed), lint, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check secateur tests bench
# docs/cli.md is generated from the commands' own help: a flag changed without it fails here
python scripts/gen_cli_docs.py --check
# One worker per core (tests are mostly single-threaded: tiny models, subprocess reloads);
# tests/conftest.py splits torch's threads between the workers. --dist worksteal keeps a few
# long tests from leaving one core idle at the end.
python -m pytest -q -n auto --dist worksteal "$@"
