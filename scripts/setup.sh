#!/usr/bin/env bash
# Install sftforge (editable) with its test extras into the current Python.
# torch: when it is missing, install the local CPU build (pip install torch==2.13.0); an unpinned torch may pull a
# multi-GB CUDA build. When torch is already there (any version >= 2.6), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q -e ".[test]"
