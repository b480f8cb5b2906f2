"""sftforge: supervised fine-tuning of causal LMs on multi-turn chat and tool-calling data."""

__version__ = "0.1.0"
