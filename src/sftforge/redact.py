"""Secrets are never printed, logged or saved: which names and values are secret, and the redacted copy of a config
(or any text) that the console, metrics.jsonl, wandb / swanlab, the report and saved configs get.

Secret values are learned twice: from the environment (``SECRET_ENV`` and any secret-looking variable name) and from
every config value under a secret-looking key that :func:`redacted` has seen, so a later :func:`scrub` of free text
(an error message, a log line) hides them too.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
"""Always treated as secrets; any other environment variable whose name looks secret (see is_secret_key) too."""
_SECRET_NAME = re.compile(
    r"(^|[_\-.])(token|secret|password|passwd|api[_\-]?key|access[_\-]?key|secret[_\-]?key|private[_\-]?key|"
    r"auth|credentials?)$|^(key|secret)$",
    re.IGNORECASE,
)
_NOT_SECRET = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask)_token$", re.IGNORECASE)  # template kwargs, not secrets
_seen_secrets: set[str] = set()


def is_secret_key(name: str) -> bool:
    """True for names like hf_token, WANDB_API_KEY, secret, db_password; False for tokenizer_path, messages_key."""
    return bool(_SECRET_NAME.search(str(name))) and not _NOT_SECRET.match(str(name))


def _secret_values() -> list[str]:
    env = [v for k, v in os.environ.items() if (k in SECRET_ENV or is_secret_key(k)) and len(v) >= 8]
    return sorted({*env, *_seen_secrets}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` with every known secret value (secret-looking environment variables and config values) replaced."""
    for value in _secret_values():
        text = text.replace(value, REDACTED)
    return text


def redacted(obj: Any) -> Any:
    """A copy of a config dict (nested dicts/lists) safe to print, log or save: values under secret-looking keys
    become ``***`` and known secret values inside any string are replaced. Use it for everything that shows a config.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if is_secret_key(k) and v not in (None, "", [], {}):
                if isinstance(v, str) and len(v) >= 6:
                    _seen_secrets.add(v)
                out[k] = REDACTED
            else:
                out[k] = redacted(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [redacted(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj


__all__ = ["REDACTED", "SECRET_ENV", "is_secret_key", "redacted", "scrub"]
