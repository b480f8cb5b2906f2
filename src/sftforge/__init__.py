"""sftforge: supervised fine-tuning of causal LMs on multi-turn chat and tool-calling data.

The Python API is the command line's own code, reachable by name (docs/python-api.md)::

    from sftforge import evaluate, load_config, train

    cfg = load_config("examples/quickstart.yaml", {"trainer.max_steps": 60})   # or load_config(model={...}, ...)
    result = train(cfg)                                                         # as `sftforge train`
    print(evaluate(result["final_dir"], "examples/quickstart/test.jsonl", "exact").summary["accuracy"])

==================  ===========================================================================================
``load_config``     a :class:`Config` from a YAML path, sections as keyword arguments and/or overrides
``train``           SFT (``sftforge train``); ``model=`` / ``tokenizer=`` / ``train_dataset=`` may be passed in
``rl``              GRPO / DAPO (``sftforge rl``)
``evaluate``        generate and score (``sftforge eval``); returns an :class:`EvalResult`
``export_checkpoint``  a Hugging Face folder from a ``step_<N>`` checkpoint (``sftforge export``)
``Config``, ``ConfigError``, ``DataError``, ``EvalResult``: the types the functions take, raise and return
==================  ===========================================================================================

The names load on first use (``import sftforge`` stays light: the command line's ``--help`` does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    "load_config": "sftforge.config",
    "Config": "sftforge.config",
    "ConfigError": "sftforge.config",
    "DataError": "sftforge.data",
    "train": "sftforge.sft",
    "rl": "sftforge.rl_loop",
    "evaluate": "sftforge.evaluation",
    "EvalResult": "sftforge.evaluation",
    "export_checkpoint": "sftforge.export",
}
__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "EvalResult",
    "evaluate",
    "export_checkpoint",
    "load_config",
    "rl",
    "train",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time the names load on first use (below)
    from sftforge.config import Config, ConfigError, load_config
    from sftforge.data import DataError
    from sftforge.evaluation import EvalResult, evaluate
    from sftforge.export import export_checkpoint
    from sftforge.rl_loop import rl
    from sftforge.sft import train


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'sftforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
