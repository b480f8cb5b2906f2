"""Where a model's files are, and what transformers needs to read them: a ``save_pretrained`` folder, a hub id, or a
GGUF file (llama.cpp's format: weights, config, tokenizer and chat template in one file).

A GGUF model is read through transformers' own GGUF reader (``from_pretrained(folder, gguf_file=name)``), which
dequantizes every tensor; it needs the ``gguf`` package (the reader) and ``accelerate`` (transformers' loading path
for quantized files). ``model.path`` may name the ``.gguf`` file itself, or a folder holding one (``model.gguf_file``
picks one of several).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sftforge.config import ConfigError

GGUF_PACKAGES = ("gguf", "accelerate")
GGUF_INSTALL = "pip install 'sftforge[gguf]' (the packages gguf and accelerate)"


def gguf_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.gguf") if p.is_file())


def gguf_location(path: str, gguf_file: str = "", key: str = "model.path") -> tuple[str, str] | None:
    """(folder, file name) when ``path`` names a GGUF model: a ``.gguf`` file, or a folder with ``.gguf`` files and
    no ``config.json`` (``gguf_file`` set, or the only one there); None for any other model (folder or hub id)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        if gguf_file and gguf_file != p.name:
            raise ConfigError(
                f"{key}={path!r} names a .gguf file and model.gguf_file={gguf_file!r} another: set only one of them."
            )
        return str(p.parent), p.name
    if not p.is_dir() or ((p / "config.json").is_file() and not gguf_file):
        if gguf_file:
            raise ConfigError(
                f"model.gguf_file={gguf_file!r} is set but {key}={path!r} is not a local folder; give "
                "the folder that holds the .gguf file, or the file itself."
            )
        return None
    found = gguf_files(p)
    if gguf_file:
        if gguf_file not in found:
            raise ConfigError(
                f"model.gguf_file={gguf_file!r} is not in {key}={path!r} (.gguf files there: "
                f"{', '.join(found) or 'none'})."
            )
        return str(p), gguf_file
    if len(found) > 1:
        raise ConfigError(
            f"{key}={path!r} holds {len(found)} .gguf files ({', '.join(found)}): pick one with "
            "model.gguf_file=NAME or name the file in the path."
        )
    return (str(p), found[0]) if found else None


def missing_gguf_packages() -> list[str]:
    return [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]


def check_gguf_packages(what: str) -> None:
    missing = missing_gguf_packages()
    if missing:
        raise ConfigError(
            f"{what} is a GGUF file: reading it needs the package{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(missing)}, not installed. Install them: {GGUF_INSTALL}."
        )


def pretrained_args(path: str, gguf_file: str = "", key: str = "model.path") -> tuple[str, dict]:
    """What to give ``from_pretrained`` for ``path``: (name or folder, extra keyword arguments)."""
    where = gguf_location(path, gguf_file, key)
    if where is None:
        return path, {}
    check_gguf_packages(f"{key}={path!r}")
    return where[0], {"gguf_file": where[1]}


def drop_quantizer(model) -> None:
    """A model read from GGUF is dequantized but still flagged as quantized (``hf_quantizer``, a
    ``quantization_config`` in its config): some transformers releases then refuse ``save_pretrained``, trainers refuse
    to fine-tune it, and an export would carry the flag. Its weights are plain tensors: drop the flag."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if "quantization_method" in vars(model):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


__all__ = [
    "GGUF_INSTALL",
    "check_gguf_packages",
    "drop_quantizer",
    "gguf_files",
    "gguf_location",
    "missing_gguf_packages",
    "pretrained_args",
]
