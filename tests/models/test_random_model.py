"""The random model (`--model random`) and its byte tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from tracedoffload.generation import FINISH_LENGTH, generate_once
from tracedoffload.models import load_model
from tracedoffload.models.random_model import RANDOM_MODEL_NAME, ByteTokenizer, build_random_model, random_model_config


@pytest.fixture(scope="module")
def random_model() -> Qwen2ForCausalLM:
    return build_random_model(seed=0)


class TestRandomModelConfig:
    def test_backbone_shape(self):
        """The config has the seeds' 28 decoder layers at the small width, with untied embeddings."""
        config = random_model_config()
        assert config.num_hidden_layers == 28
        assert (config.hidden_size, config.intermediate_size) == (256, 704)
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
        assert config.max_position_embeddings == 4096
        assert config.tie_word_embeddings is False

    def test_vocab_holds_every_byte_and_special_rounded_to_64(self):
        """The vocabulary covers the byte tokenizer's ids and is a multiple of 64."""
        config = random_model_config()
        assert config.vocab_size % 64 == 0
        assert config.vocab_size >= ByteTokenizer.vocab_size
        assert config.eos_token_id == ByteTokenizer.eos_token_id


class TestBuildRandomModel:
    def test_has_28_layers_in_eval_mode(self, random_model):
        """The built model has 28 decoder layers and is in eval mode."""
        assert len(random_model.model.layers) == 28
        assert not random_model.training

    def test_same_seed_same_weights(self, random_model):
        """Two builds with one seed have equal weights."""
        again = build_random_model(seed=0)
        for (name, a), b in zip(random_model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), name

    def test_other_seed_other_weights(self, random_model):
        """A different seed gives different weights."""
        other = build_random_model(seed=1)
        assert not torch.equal(random_model.lm_head.weight, other.lm_head.weight)

    def test_dtype(self):
        """The weights are in the dtype asked for."""
        model = build_random_model(dtype=torch.bfloat16)
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
    def test_has_no_eos_so_runs_to_the_maximum(self, random_model):
        """The random model's generation config has no eos (random weights emit one at random)."""
        assert random_model.generation_config.eos_token_id is None
        generation = generate_once(random_model, ByteTokenizer(), "hi", max_new_tokens=6)
        assert (generation.generated_tokens, generation.prompt_tokens) == (6, 3)
        assert generation.finish_reason == FINISH_LENGTH

    def test_random_model_generation(self, random_model):
        """The random model generates the number of tokens asked for."""
        generation = generate_once(random_model, ByteTokenizer(), "Hello", max_new_tokens=5)
        assert generation.generated_tokens == 5
        assert generation.seconds > 0


class TestLoadRandom:
    def test_random_by_name(self):
        """--model random loads the random model with the byte tokenizer, without any file."""
        loaded = load_model("random", seed=0)
        assert (loaded.name, loaded.source) == (RANDOM_MODEL_NAME, "random")
        assert isinstance(loaded.tokenizer, ByteTokenizer)
        assert len(loaded.model.model.layers) == 28


