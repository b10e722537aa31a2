"""How `run` chooses each token: greedy (the default), or sampled, through transformers'
`generate` and its `GenerationConfig` fields.

Sampling is on when `temperature` is above 0; then `top_p`, `top_k` and `min_p` narrow the
candidates. Greedy or sampled, `repetition_penalty` discourages tokens already in the prompt or
answer (transformers' rule), and OpenAI's `presence_penalty` and `frequency_penalty` the tokens
already in the answer (minus the penalty once for a token that appeared, minus it times its
count). `seed` makes a sampled run reproducible (the global torch generator is seeded just
before generating). Each value is checked here, naming the field and its valid range, before
any model work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tracedoffload._checks import check_int, check_number
from tracedoffload._exceptions import ConfigError


@dataclasses.dataclass(frozen=True)
class Decoding:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    presence_penalty: float = 0.0  # 0: off
    frequency_penalty: float = 0.0  # 0: off

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, 0.0, 100.0, "a number from 0 (greedy) to 100")
        check_number("top_p", self.top_p, 1e-9, 1.0, "a number above 0, at most 1")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        check_number("min_p", self.min_p, 0.0, 1.0, "a number from 0 (off) to 1")
        check_number("repetition_penalty", self.repetition_penalty, 1e-9, 100.0, "a number above 0 (1: off; above 1 discourages repeats)")
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**63 - 1)
        check_number("presence_penalty", self.presence_penalty, -2.0, 2.0, "a number from -2 to 2 (0: off)")
        check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "a number from -2 to 2 (0: off)")
        if not self.sampled and self._narrowing():
            field = self._narrowing()[0]
            raise ConfigError(field, getattr(self, field), "only with sampling: give a temperature above 0 too")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def _narrowing(self) -> list[str]:
        """Settings that only mean something when sampling, given non-neutral values."""
        neutral = {"top_p": 1.0, "top_k": None, "min_p": 0.0, "seed": None}
        return [field for field, value in neutral.items() if getattr(self, field) != value]

    def generate_kwargs(self, prompt_length: int) -> dict[str, Any]:
        """`generate`'s keyword arguments (seeding the torch generator when a seed is given);
        `prompt_length`: where the answer starts in the rows `generate` sees."""
        # Imported here: `run` checks its flags through this module before torch is imported.
        from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        kwargs: dict[str, Any] = {"do_sample": self.sampled}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        answer = AnswerPenalties(prompt_length, self.presence_penalty, self.frequency_penalty) if self.presence_penalty or self.frequency_penalty else None
        if not self.sampled:
            if answer is not None:
                kwargs["logits_processor"] = LogitsProcessorList([answer])
            return kwargs
        import torch

        if self.seed is not None:
            torch.manual_seed(self.seed)
        if answer is None:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
            if self.min_p:
                kwargs["min_p"] = self.min_p
            return kwargs
        # `generate` runs the processors it is given after its own, its warpers included, and the
        # penalties shift the logits before the temperature divides them and the candidates are
        # chosen (as OpenAI and the server order them). So the warpers come here, after the
        # penalties and in `generate`'s own order, and `generate` is given neutral values.
        warpers: list[Any] = [answer, TemperatureLogitsWarper(self.temperature)]
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        if self.min_p:
            warpers.append(MinPLogitsWarper(self.min_p))
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0, min_p=None, logits_processor=LogitsProcessorList(warpers))
        return kwargs


class AnswerPenalties:
    """OpenAI's presence and frequency penalties over each row's answer so far (its tokens from
    `prompt_length` on): a token's logit minus `presence` if it appeared, minus `frequency`
    times its count. A transformers logits processor (called with the rows and their scores)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        answer = input_ids[:, self.prompt_length :]
        if answer.shape[1] == 0:
            return scores
        counts = scores.new_zeros(scores.shape).scatter_add_(1, answer, scores.new_ones(answer.shape))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts
