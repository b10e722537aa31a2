"""How `run` chooses each token: greedy (the default), or sampled, through transformers'
`generate` and its `GenerationConfig` fields.

Sampling is on when `temperature` is above 0; then `top_p`, `top_k` and `min_p` narrow the
candidates and `repetition_penalty` discourages tokens already in the prompt or answer. `seed`
makes a sampled run reproducible (the global torch generator is seeded just before generating).
Each value is checked here, naming the field and its valid range, before any model work.
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

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, 0.0, 100.0, "a number from 0 (greedy) to 100")
        check_number("top_p", self.top_p, 1e-9, 1.0, "a number above 0, at most 1")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1)
        check_number("min_p", self.min_p, 0.0, 1.0, "a number from 0 (off) to 1")
        check_number("repetition_penalty", self.repetition_penalty, 1e-9, 100.0, "a number above 0 (1: off; above 1 discourages repeats)")
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**63 - 1)
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

    def generate_kwargs(self) -> dict[str, Any]:
        """`generate`'s keyword arguments (seeding the torch generator when a seed is given)."""
        kwargs: dict[str, Any] = {"do_sample": self.sampled}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if not self.sampled:
            return kwargs
        import torch

        if self.seed is not None:
            torch.manual_seed(self.seed)
        kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        if self.min_p:
            kwargs["min_p"] = self.min_p
        return kwargs

