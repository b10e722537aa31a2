"""generate_once and encode_prompt: chat templates, stopping at eos or the maximum, and bad prompts."""

from __future__ import annotations

import pytest
import torch

from tracedoffload import TracedOffloadError
from tracedoffload.generation import FINISH_LENGTH, FINISH_STOP, encode_prompt, generate_once
from tracedoffload.models import load_model
from tracedoffload.models.random_model import ByteTokenizer, build_random_model

from tests.models.tiny import save_byte_level_tokenizer, save_tiny_qwen2

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def always_zero():
    """The random model with a zeroed LM head: every logit equal, so greedy emits id 0 each time."""
    model = build_random_model(seed=0)
    torch.nn.init.zeros_(model.lm_head.weight)
    return model


@pytest.fixture
def chat_tokenizer(tmp_path):
    """A byte-level tokenizer with a small chat template."""
    save_byte_level_tokenizer(tmp_path)
    save_tiny_qwen2(tmp_path)
    loaded = load_model(str(tmp_path))
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    return loaded.tokenizer


class TestStopping:
    def test_eos_stops_and_says_so(self, always_zero):
        """With id 0 as the eos, generation stops after it: finish reason "stop", the token named."""
        always_zero.generation_config.eos_token_id = 0
        try:
            generation = generate_once(always_zero, ByteTokenizer(), "hi", max_new_tokens=6)
        finally:
            always_zero.generation_config.eos_token_id = None
        assert (generation.generated_tokens, generation.finish_reason) == (1, FINISH_STOP)
        assert generation.stop_token == "\x00"

    def test_a_list_of_eos_ids(self, always_zero):
        """A generation config may list several eos ids (end-of-turn and end-of-text)."""
        always_zero.generation_config.eos_token_id = [7, 0]
        try:
            generation = generate_once(always_zero, ByteTokenizer(), "hi", max_new_tokens=6)
        finally:
            always_zero.generation_config.eos_token_id = None
        assert (generation.generated_tokens, generation.finish_reason) == (1, FINISH_STOP)

    def test_ignore_eos_runs_to_the_maximum(self, always_zero):
        """ignore_eos (the benchmarks') generates exactly max_new_tokens, eos or not."""
        always_zero.generation_config.eos_token_id = 0
        try:
            generation = generate_once(always_zero, ByteTokenizer(), "hi", max_new_tokens=6, ignore_eos=True)
        finally:
            always_zero.generation_config.eos_token_id = None
        assert (generation.generated_tokens, generation.finish_reason, generation.stop_token) == (6, FINISH_LENGTH, None)


class TestPrompts:
    def test_chat_template_applied_with_system(self, chat_tokenizer):
        """A tokenizer with a chat template gets the system and user turns and the assistant cue."""
        ids = encode_prompt(chat_tokenizer, "hello", system="be brief")["input_ids"][0]
        assert chat_tokenizer.decode(ids) == "<system>be brief\n<user>hello\n<assistant>"

    def test_raw_sends_plain_text(self, chat_tokenizer):
        """raw=True skips the chat template."""
        ids = encode_prompt(chat_tokenizer, "hello", raw=True)["input_ids"][0]
        assert chat_tokenizer.decode(ids) == "hello"

    def test_system_without_a_template_is_refused(self, chat_tokenizer):
        """A system message that would be dropped silently is an error naming the field."""
        with pytest.raises(TracedOffloadError, match="system='be brief' needs a chat template: ByteTokenizer has no chat template"):
            encode_prompt(ByteTokenizer(), "hello", system="be brief")
        with pytest.raises(TracedOffloadError, match="--raw sends the prompt as plain text"):
            encode_prompt(chat_tokenizer, "hello", system="be brief", raw=True)

    def test_empty_prompt_is_refused(self, chat_tokenizer):
        """A prompt of no tokens is refused before the model runs."""
        with pytest.raises(TracedOffloadError, match="encodes to no tokens"):
            encode_prompt(chat_tokenizer, "", raw=True)
