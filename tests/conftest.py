"""Shared test fixtures.

Tokenizers in tests/fixtures/tokenizers are copies of ../shared/assets/tokenizers (Qwen3, Qwen2.5: Qwen2 BPE
vocabulary from llama.cpp's ggml-vocab-qwen2.gguf with the public added tokens and chat templates, Apache-2.0;
Phi-3: ggml-vocab-phi-3.gguf with the Phi-3.5-mini-instruct template, MIT), with tokenizer.json xz-compressed.
tests/fixtures/textcraft holds the first 40 rows of ../shared/data/textcraft (platoon-textcraft, MIT).
tests/fixtures/model_configs holds config.json shapes from ../shared/assets/model_configs, and two tiny
vision-language shapes written here (qwen2.5-vl-tiny, qwen3-vl-tiny: the public architectures, 2 layers).
tests/fixtures/processors: the Qwen2.5-VL chat template and image-processor settings and the Qwen3-VL chat template
from ../shared/assets/processors (Qwen, Apache-2.0); qwen3-vl/preprocessor_config.json is written here with the
public Qwen3-VL values (16-px patches, merge 2, mean/std 0.5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sftforge.bench import unpack_tokenizer  # the one unpacker of the vendored tokenizers (bench uses it too)

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_NAMES = ("qwen3", "qwen2.5", "phi3")


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {n: unpack_tokenizer(n, root) for n in TOKENIZER_NAMES}


@pytest.fixture(scope="session")
def tokenizers(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(str(p)) for n, p in tokenizer_dirs.items()}


@pytest.fixture(scope="session")
def textcraft_dir() -> Path:
    return FIXTURES / "textcraft"


@pytest.fixture(scope="session")
def model_config_dir() -> Path:
    return FIXTURES / "model_configs"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Never write the tokenization cache into the user's home during tests.
    monkeypatch.setenv("SFTFORGE_CACHE", str(tmp_path / "sftforge-cache"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available (benchmarks/gpu_check.py runs them on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
