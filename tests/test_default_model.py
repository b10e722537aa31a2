"""The embedded default model, its byte tokenizer, and loading from a local directory."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tracedoffload import TracedOffloadError
from tracedoffload.cli.run import generate_once
from tracedoffload.default_model import (
    DEFAULT_MODEL_NAME,
    ByteTokenizer,
    build_default_model,
    default_model_config,
    load_model,
)


@pytest.fixture(scope="module")
def default_model() -> Qwen2ForCausalLM:
    return build_default_model(seed=0)


def save_tiny_qwen2(directory, vocab_size: int = 320) -> None:
    """Write a 4-layer Qwen2 with random weights to `directory`, as save_pretrained does."""
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)


class TestDefaultModelConfig:
    def test_backbone_shape(self):
        """The config has the seeds' 28 decoder layers at the small width, with untied embeddings."""
        config = default_model_config()
        assert config.num_hidden_layers == 28
        assert (config.hidden_size, config.intermediate_size) == (256, 704)
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
        assert config.max_position_embeddings == 4096
        assert config.tie_word_embeddings is False

    def test_vocab_holds_every_byte_and_special_rounded_to_64(self):
        """The vocabulary covers the byte tokenizer's ids and is a multiple of 64."""
        config = default_model_config()
        assert config.vocab_size % 64 == 0
        assert config.vocab_size >= ByteTokenizer.vocab_size
        assert config.eos_token_id == ByteTokenizer.eos_token_id


class TestBuildDefaultModel:
    def test_has_28_layers_in_eval_mode(self, default_model):
        """The built model has 28 decoder layers and is in eval mode."""
        assert len(default_model.model.layers) == 28
        assert not default_model.training

    def test_same_seed_same_weights(self, default_model):
        """Two builds with one seed have equal weights."""
        again = build_default_model(seed=0)
        for (name, a), b in zip(default_model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), name

    def test_other_seed_other_weights(self, default_model):
        """A different seed gives different weights."""
        other = build_default_model(seed=1)
        assert not torch.equal(default_model.lm_head.weight, other.lm_head.weight)

    def test_dtype(self):
        """The weights are in the dtype asked for."""
        model = build_default_model(dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


class TestByteTokenizer:
    def test_round_trip_non_ascii(self):
        """Encoding then decoding gives the text back, multi-byte characters included."""
        tokenizer = ByteTokenizer()
        text = "héllo, wörld ☃ 日本語 🚀"
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id
        assert all(0 <= i < 256 for i in ids[1:])
        assert tokenizer.decode(ids) == text

    def test_decode_drops_specials_and_replaces_invalid_bytes(self):
        """Special and out-of-range ids are dropped; an invalid UTF-8 byte becomes U+FFFD."""
        tokenizer = ByteTokenizer()
        assert tokenizer.decode([tokenizer.bos_token_id, 104, 105, tokenizer.eos_token_id, 300]) == "hi"
        assert tokenizer.decode(torch.tensor([104, 0xFF, 105])) == "h\ufffdi"

    def test_call_returns_batched_tensors(self):
        """Calling with return_tensors="pt" gives (1, n) input_ids and an all-ones attention_mask."""
        encoded = ByteTokenizer()("abc", return_tensors="pt")
        assert encoded["input_ids"].tolist() == [[ByteTokenizer.bos_token_id, 97, 98, 99]]
        assert encoded["attention_mask"].tolist() == [[1, 1, 1, 1]]


class TestGenerateOnce:
    def test_runs_exactly_max_new_tokens_even_when_eos_is_likeliest(self, default_model):
        """Generation never stops early on eos, even when the model emits nothing else."""
        model = build_default_model(seed=0)
        torch.nn.init.zeros_(model.lm_head.weight)  # every logit equal: greedy picks id 0
        model.generation_config.eos_token_id = 0
        generation = generate_once(model, ByteTokenizer(), "hi", max_new_tokens=6)
        assert generation.generated_tokens == 6
        assert generation.prompt_tokens == 3

    def test_default_model_generation(self, default_model):
        """The default model generates the number of tokens asked for."""
        generation = generate_once(default_model, ByteTokenizer(), "Hello", max_new_tokens=5)
        assert generation.generated_tokens == 5
        assert generation.seconds > 0


class TestLoadModel:
    def test_none_is_the_embedded_default(self):
        """No path loads the embedded default model with the byte tokenizer."""
        model, tokenizer, name = load_model(None, seed=0)
        assert name == DEFAULT_MODEL_NAME
        assert isinstance(tokenizer, ByteTokenizer)
        assert len(model.model.layers) == 28

    def test_missing_path(self, tmp_path):
        """A path that does not exist is refused with the path in the message."""
        with pytest.raises(TracedOffloadError, match="no such directory"):
            load_model(str(tmp_path / "absent"))

    def test_directory_without_config(self, tmp_path):
        """A directory without config.json is refused."""
        with pytest.raises(TracedOffloadError, match="no config.json"):
            load_model(str(tmp_path))

    def test_local_directory_without_tokenizer(self, tmp_path):
        """A save_pretrained directory loads, in the dtype asked for, with the byte tokenizer."""
        save_tiny_qwen2(tmp_path)
        model, tokenizer, name = load_model(str(tmp_path), torch.float32)
        assert name == tmp_path.name
        assert isinstance(tokenizer, ByteTokenizer)
        assert len(model.model.layers) == 4
        assert not model.training

    def test_vocab_too_small_for_byte_tokenizer(self, tmp_path):
        """A model without a tokenizer whose vocabulary cannot hold the byte ids is refused."""
        save_tiny_qwen2(tmp_path, vocab_size=96)
        with pytest.raises(TracedOffloadError, match="no tokenizer"):
            load_model(str(tmp_path))

    def test_local_directory_with_tokenizer(self, tmp_path):
        """A directory that ships a tokenizer loads it with AutoTokenizer."""
        from tokenizers import Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE
        from transformers import PreTrainedTokenizerFast

        save_tiny_qwen2(tmp_path)
        # A byte-level BPE without merges: the shape of tokenizer AutoTokenizer builds for Qwen2.
        bpe = Tokenizer(BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path)
        model, tokenizer, _ = load_model(str(tmp_path))
        assert not isinstance(tokenizer, ByteTokenizer)
        assert tokenizer.decode(tokenizer("hello wörld")["input_ids"]) == "hello wörld"
        assert generate_once(model, tokenizer, "hello world", max_new_tokens=3).generated_tokens == 3
        with pytest.raises(TracedOffloadError, match="encodes to no tokens"):
            generate_once(model, tokenizer, "", max_new_tokens=3)
