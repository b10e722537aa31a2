"""The seeded sampler's draw: keyed by seed and token index alone, exact in distribution, and never
a filtered token."""

from __future__ import annotations

import collections
import math

import torch

from tracedoffload.serve.seeded_sampling import UNSEEDED, SeededSampler, answer_index, gumbel_choice, stream_key


def test_keys_are_31_bit_deterministic_and_differ_by_seed_and_index():
    keys = {stream_key(seed, index) for seed in (-1, 0, 1, 2**40) for index in range(50)}
    assert len(keys) == 200 and all(0 <= key < 2**31 for key in keys)
    assert stream_key(3, 4) == stream_key(3, 4)


def test_draws_follow_the_softmax_of_the_scores():
    """4000 keys over 4 tokens with probabilities .5/.25/.15/.1: each frequency within 5 standard
    deviations of its probability (the keys are fixed, so the draw is too)."""
    probabilities = torch.tensor([0.5, 0.25, 0.15, 0.1])
    scores = probabilities.log()
    counts = collections.Counter(gumbel_choice(scores, stream_key(11, i)) for i in range(4000))
    for token, p in enumerate(probabilities.tolist()):
        assert abs(counts[token] / 4000 - p) < 5 * math.sqrt(p * (1 - p) / 4000), counts


def test_filtered_tokens_are_never_drawn():
    scores = torch.tensor([float("-inf"), 0.0, float("-inf"), 1.0])
    assert {gumbel_choice(scores, stream_key(0, i)) for i in range(500)} == {1, 3}


class _State:
    def __init__(self, seed, generated, initial=(1, 2, 3), true_prompt=0):
        self.logit_processor_kwargs = {} if seed is None else {"seed": seed}
        self.generated_tokens = list(generated)
        self.initial_tokens = list(initial)
        self._true_initial_tokens = true_prompt


class _Future:
    def __init__(self, state):
        self.state = state


def test_a_seeded_row_keeps_one_token_and_an_unseeded_row_is_untouched():
    sampler = SeededSampler()
    requests = [_Future(_State(5, [9, 9])), _Future(_State(None, []))]
    keys = sampler.prepare_tensor_args(requests)
    assert keys.tolist() == [stream_key(5, 2), UNSEEDED]
    scores = torch.randn(2, 10)
    out = sampler(scores, keys)
    assert torch.equal(out[1], scores[1])
    assert torch.isfinite(out[0]).sum() == 1 and int(out[0].argmax()) == gumbel_choice(scores[0], stream_key(5, 2))


def test_an_evicted_request_counts_the_tokens_moved_into_its_prompt():
    """The manager re-queues an evicted request with its answer so far appended to its prompt."""
    assert answer_index(_State(1, [7], initial=(1, 2, 3, 4, 5), true_prompt=3)) == 3
    assert answer_index(_State(1, [7, 8])) == 2
