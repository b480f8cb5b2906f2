"""Typed configuration: the dataclasses (:mod:`sftforge.config.schema`), YAML + dotted ``key=value`` overrides,
validation and the reference table (:mod:`sftforge.config.load`), verl's keys (:mod:`sftforge.config.verl`).

``from sftforge.config import X`` keeps working for every name the single ``config.py`` had; the secret redaction it
also held lives in :mod:`sftforge.redact` and is re-exported here for the same reason.
"""

from sftforge.config.load import (
    RANGES,
    all_keys,
    config_reference,
    field_docs,
    load_config,
    names_model,
    parse_memory,
    validate,
)
from sftforge.config.schema import (
    CHOICES,
    AlgorithmConfig,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    SandboxConfig,
    TrainerConfig,
    to_dict,
)
from sftforge.config.verl import VERL_ALIASES, VERL_RL_KEYS, apply_verl_aliases, verl_rl_table
from sftforge.redact import REDACTED, SECRET_ENV, is_secret_key, redacted, scrub

__all__ = [
    "CHOICES",
    "RANGES",
    "REDACTED",
    "SECRET_ENV",
    "VERL_ALIASES",
    "VERL_RL_KEYS",
    "AlgorithmConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "SandboxConfig",
    "TrainerConfig",
    "all_keys",
    "apply_verl_aliases",
    "config_reference",
    "field_docs",
    "is_secret_key",
    "load_config",
    "names_model",
    "parse_memory",
    "redacted",
    "scrub",
    "to_dict",
    "validate",
    "verl_rl_table",
]
