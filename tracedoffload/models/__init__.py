"""Models and where they come from: the default GGUF, the random model, any GGUF file or directory.

    loading.py       load_model / load_config: what --model names, with its tokenizer
    gguf_file.py     the default model's file; checking and converting a GGUF
    cache.py         the converted-model cache (content-keyed, atomic, verified)
    random_model.py  the random 28-layer model and its byte tokenizer

`load_model`, `load_config` and `LoadedModel` are imported on first use: the command line reads
`RANDOM_MODEL` here without importing torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracedoffload._lazy import lazy_exports

RANDOM_MODEL = "random"  # what --model takes for the random model

_EXPORTS = dict.fromkeys(("LoadedModel", "load_config", "load_model"), f"{__name__}.loading")
__all__ = ["RANDOM_MODEL", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from tracedoffload.models.loading import LoadedModel, load_config, load_model
