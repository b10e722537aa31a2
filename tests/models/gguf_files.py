"""Small GGUF files written with the `gguf` package, for the loader's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gguf(path: Path, architecture: str, *, tokenizer: bool) -> Path:
    """A GGUF holding one tensor, with or without an embedded tokenizer field."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    if tokenizer:
        writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
