"""The random model (`--model random`) and its byte-level tokenizer.

It has the seeds' backbone shape (28 Qwen2 decoder layers) at a small width, randomly
initialised from a seed: no file, no conversion, the same weights for the same seed. The test
suite and load-free experiments use it; its text means nothing. It has no end-of-sequence token
(a random model emits one at random), so a generation always runs to its maximum.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tracedoffload._exceptions import TracedOffloadError
from tracedoffload.models import RANDOM_MODEL

__all__ = ["RANDOM_MODEL", "RANDOM_MODEL_NAME", "RANDOM_NUM_LAYERS", "ByteTokenizer", "build_random_model", "random_model_config"]

RANDOM_MODEL_NAME = "tracedoffload-random-qwen2-28l"
RANDOM_NUM_LAYERS = 28  # the seeds' backbone


class ByteTokenizer:
    """A tokenizer with one id per byte of UTF-8 text, plus pad, bos and eos.

    Ids 0-255 are the bytes; the special tokens follow. It needs no files, so it pairs with the
    random model and with any local model directory that ships no tokenizer.
    """

    num_bytes = 256
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259  # ids in use; the random model's embedding table is rounded up from this

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


def random_model_config() -> Qwen2Config:
    """The random model's config: 28 Qwen2 layers, hidden size 256, byte vocabulary."""
    tokenizer = ByteTokenizer
    return Qwen2Config(
        # Rounded up to a multiple of 64 so the embedding and LM-head matmuls stay aligned.
        vocab_size=-(-tokenizer.vocab_size // 64) * 64,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=RANDOM_NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # Untied, as in Qwen2-7B-class backbones: the LM head is its own resident tensor.
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_random_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """The random model, randomly initialised from `seed`, in eval mode, on the CPU.

    The same seed gives the same weights on every call (the global torch RNG is reseeded).

    Example:
        >>> model = build_random_model(seed=0)
        >>> len(model.model.layers)
        28
    """
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(random_model_config())
    # Random weights emit the eos id at random: without one, generation runs to its maximum and
    # every run and benchmark of this model makes the same number of tokens.
    model.generation_config.eos_token_id = None
    return model.to(dtype).eval()
