"""Models and where they come from: the default GGUF, the random model, any GGUF file or directory.

    loading.py       load_model / load_config: what --model names, with its tokenizer
    gguf_file.py     the default model's file; checking and converting a GGUF
    cache.py         the converted-model cache (content-keyed, atomic, verified)
    random_model.py  the random 28-layer model and its byte tokenizer
"""

from tracedoffload.models.loading import LoadedModel, load_config, load_model

__all__ = ["LoadedModel", "load_config", "load_model"]
