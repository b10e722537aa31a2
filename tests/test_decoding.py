"""`run`'s sampling controls: checked by name, reproducible with a seed, greedy untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tracedoffload import OffloadConfig, offload
from tracedoffload._exceptions import ConfigError
from tracedoffload.decoding import Decoding
from tracedoffload.generation import generate_once
from tracedoffload.models.random_model import ByteTokenizer
from tests.tracing.test_batches import llama

PROMPT = "offloaded sampling"


@pytest.fixture(scope="module")
def offloaded():
    model = llama(260)
    offloader = offload(model, OffloadConfig(num_layers_on_gpu=2))
    yield model
    offloader.detach()


def answer(model, decoding=None) -> str:
    return generate_once(model, ByteTokenizer(), PROMPT, 16, raw=True, ignore_eos=True, decoding=decoding).text


class TestChecks:
    @pytest.mark.parametrize(
        "settings, field",
        [
            ({"temperature": -1}, "temperature"),
            ({"temperature": 1, "top_p": 0}, "top_p"),
            ({"temperature": 1, "top_k": 0}, "top_k"),
            ({"temperature": 1, "min_p": 1.5}, "min_p"),
            ({"repetition_penalty": 0}, "repetition_penalty"),
            ({"temperature": 1, "seed": -3}, "seed"),
            ({"top_k": 5}, "top_k"),  # without sampling it would mean nothing
            ({"seed": 5}, "seed"),
        ],
    )
    def test_each_bad_value_names_its_field(self, settings, field):
        with pytest.raises(ConfigError, match=field):
            Decoding(**settings)

    def test_run_refuses_a_bad_flag_by_name_before_loading(self):
        result = subprocess.run([sys.executable, "-m", "tracedoffload", "run", "--temperature", "0.7", "--min-p", "2"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "min_p" in result.stderr


class TestSampling:
    def test_a_seed_reproduces_a_sample_and_another_seed_differs(self, offloaded):
        first = answer(offloaded, Decoding(temperature=1.5, seed=7))
        assert answer(offloaded, Decoding(temperature=1.5, seed=7)) == first
        assert answer(offloaded, Decoding(temperature=1.5, seed=8)) != first
        assert first != answer(offloaded)  # sampled, not greedy

    def test_narrowing_to_one_candidate_is_greedy(self, offloaded):
        assert answer(offloaded, Decoding(temperature=1.5, top_k=1, seed=1)) == answer(offloaded)

    def test_a_repetition_penalty_changes_the_greedy_answer(self, offloaded):
        assert answer(offloaded, Decoding(repetition_penalty=5.0)) != answer(offloaded)
