"""Models and where they come from: the default GGUF, the random model, any GGUF file or directory.

    loading.py       load_model / load_config: what --model names, with its tokenizer
    gguf_file.py     the default model's file; checking and converting a GGUF
    cache.py         the converted-model cache (content-keyed, atomic, verified)
    random_model.py  the random 28-layer model and its byte tokenizer

`load_model`, `load_config` and `LoadedModel` are imported on first use: the command line reads
`RANDOM_MODEL` here without importing torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

RANDOM_MODEL = "random"  # what --model takes for the random model

__all__ = ["RANDOM_MODEL", "LoadedModel", "load_config", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("LoadedModel", "load_config", "load_model"):
        return getattr(importlib.import_module("tracedoffload.models.loading"), name)
    raise AttributeError(f"module 'tracedoffload.models' has no attribute {name!r}")


if TYPE_CHECKING:
    from tracedoffload.models.loading import LoadedModel, load_config, load_model
