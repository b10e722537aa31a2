"""The embedded default model, its byte-level tokenizer, and loading a model from a local directory.

Nothing is ever downloaded. The default model has the seeds' backbone shape (28 Qwen2 decoder
layers) at a small width, randomly initialised from a seed, so every command and benchmark runs
on a machine without network access or model files. Its output tokens are random: generation
must not stop on an end-of-sequence token (see `tracedoffload.cli.run.generate_once`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from tracedoffload._exceptions import TracedOffloadError

DEFAULT_MODEL_NAME = "tracedoffload-default-qwen2-28l"
DEFAULT_NUM_LAYERS = 28  # the seeds' backbone
# Files whose presence means the directory ships its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """A tokenizer with one id per byte of UTF-8 text, plus pad, bos and eos.

    Ids 0-255 are the bytes; the special tokens follow. It needs no files, so it pairs with the
    embedded default model and with any local model directory that ships no tokenizer.
    """

    num_bytes = 256
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259  # ids in use; the default model's embedding table is rounded up from this

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """The ids of `text`'s UTF-8 bytes, after a bos id unless `add_bos` is False."""
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; ids that are not bytes are dropped, invalid UTF-8 becomes U+FFFD.

        Args:
            ids: a list of ids or a 1-D tensor (a model emits ids beyond the bytes, too).
            skip_special_tokens: accepted for compatibility with transformers tokenizers;
                special and out-of-range ids are always dropped, since they have no text.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return bytes(i for i in ids if 0 <= i < self.num_bytes).decode("utf-8", errors="replace")

    def __call__(self, text: str, return_tensors: str | None = None) -> dict[str, Any]:
        """Encode one text like a transformers tokenizer: `input_ids` and `attention_mask`.

        Args:
            text: the prompt.
            return_tensors: "pt" for (1, n) int64 tensors; None for plain lists.

        Raises:
            TracedOffloadError: `return_tensors` is neither "pt" nor None.
        """
        ids = self.encode(text)
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_tensors != "pt":
            raise TracedOffloadError(f"return_tensors={return_tensors!r}: ByteTokenizer supports 'pt' or None")
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def default_model_config() -> Qwen2Config:
    """The embedded default model's config: 28 Qwen2 layers, hidden size 256, byte vocabulary."""
    tokenizer = ByteTokenizer
    return Qwen2Config(
        # Rounded up to a multiple of 64 so the embedding and LM-head matmuls stay aligned.
        vocab_size=-(-tokenizer.vocab_size // 64) * 64,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=DEFAULT_NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # Untied, as in Qwen2-7B-class backbones: the LM head is its own resident tensor.
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_default_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """The embedded default model, randomly initialised from `seed`, in eval mode, on the CPU.

    The same seed gives the same weights on every call (the global torch RNG is reseeded).

    Example:
        >>> model = build_default_model(seed=0)
        >>> len(model.model.layers)
        28
    """
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(default_model_config())
    return model.to(dtype).eval()


def load_model(path: str | None, dtype: torch.dtype | None = None, *, seed: int = 0) -> tuple[torch.nn.Module, Any, str]:
    """Load a causal LM and its tokenizer, never from the network.

    Args:
        path: None for the embedded default model; otherwise a local directory written by
            `save_pretrained` (a `config.json` and weights; a tokenizer is optional).
        dtype: the weights' dtype; None keeps float32 for the default model and the saved
            dtype for a directory.
        seed: the default model's initialisation seed (ignored for a directory).

    Returns:
        `(model, tokenizer, name)`; the tokenizer is the directory's own when it ships one,
        else a `ByteTokenizer`.

    Raises:
        TracedOffloadError: the path is missing, is not a model directory, or cannot be loaded.
    """
    if path is None:
        return build_default_model(seed, dtype or torch.float32), ByteTokenizer(), DEFAULT_MODEL_NAME
    directory = Path(path)
    if not directory.is_dir():
        raise TracedOffloadError(f"model={path!r}: no such directory (pass a local directory written by save_pretrained, or omit --model for the embedded default)")
    if not (directory / "config.json").is_file():
        raise TracedOffloadError(f"model={path!r} is not a model directory: it has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype or "auto")
        has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True) if has_tokenizer else ByteTokenizer()
    except (OSError, ValueError, KeyError) as error:
        raise TracedOffloadError(f"model={path!r} could not be loaded: {error}") from None
    if isinstance(tokenizer, ByteTokenizer) and model.get_input_embeddings().num_embeddings < ByteTokenizer.vocab_size:
        # Byte ids would index past the embedding table and fail deep inside the forward pass.
        raise TracedOffloadError(
            f"model={path!r} ships no tokenizer and its vocabulary ({model.get_input_embeddings().num_embeddings}) "
            f"is smaller than the byte tokenizer's ({ByteTokenizer.vocab_size}); save a tokenizer with the model"
        )
    return model.eval(), tokenizer, directory.name
