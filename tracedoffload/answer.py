"""What one row of `generate`'s output says: where the answer ends, its text, why it stopped,
and its tokens' log-probabilities.

An answer ends at the first end-of-sequence token (kept in its count, not in its text) or at
the first of the caller's stop strings. transformers stops a row at a stop string
(`stop_strings`, `StopStringCriteria`) with the string in its tokens; the answer's text ends
just before it, as OpenAI's API ends it, and its token count includes the tokens that spelled it
(they were generated). The rows of a batch that stopped before the others are padded by
`generate`; the padding is no part of the answer.

Log-probabilities are the model's own (the log-softmax of the raw logits, before any penalty,
temperature or filter), as OpenAI reports them: the chosen token's and the most likely ones'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from tracedoffload._checks import check_int
from tracedoffload._exceptions import ConfigError

MAX_STOP_STRINGS = 4  # as OpenAI's API allows
MAX_TOP_LOGPROBS = 20


class TokenLogprob(NamedTuple):
    token: str  # its text (a byte-level piece may be part of a character: U+FFFD then)
    logprob: float
    top: tuple[tuple[str, float], ...]  # the most likely tokens and theirs, best first


class Answer(NamedTuple):
    tokens: list[int]  # the generated tokens that belong to it (an end token or a stop string's included)
    text: str
    stop_token: str | None = None  # the end-of-sequence token that ended it, as text
    stop_string: str | None = None  # the stop string that ended it

    @property
    def stopped(self) -> bool:
        """Ended by the model or a stop string (not by the maximum)."""
        return self.stop_token is not None or self.stop_string is not None


def check_stop(stop: Sequence[str], tokenizer: Any = None) -> tuple[str, ...]:
    """Stop strings: up to `MAX_STOP_STRINGS`, none empty; with a `tokenizer`, one that has a
    vocabulary (transformers matches stop strings against it)."""
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise ConfigError("stop", list(stop), f"at most {MAX_STOP_STRINGS} strings")
    if any(not isinstance(s, str) or not s for s in stop):
        raise ConfigError("stop", list(stop), "non-empty strings")
    if stop and tokenizer is not None and not hasattr(tokenizer, "get_vocab"):
        raise ConfigError("stop", list(stop), f"no stop strings with {type(tokenizer).__name__}: transformers matches them against a tokenizer's vocabulary, which it has not")
    return stop


def check_top_logprobs(top: int | None) -> int | None:
    """How many alternatives to report per token (0: the chosen token's only); None: no log-probabilities."""
    return None if top is None else check_int("logprobs", top, 0, MAX_TOP_LOGPROBS)


def end_of_answer(tokenizer: Any, tokens: list[int], stop_ids: set[int], stop: Sequence[str] = ()) -> Answer:
    """The answer in one row's generated `tokens`."""
    end = next((n + 1 for n, token in enumerate(tokens) if token in stop_ids), None)
    kept = tokens[:end] if end is not None else tokens
    text = tokenizer.decode(kept, skip_special_tokens=True)
    found = [(text.find(s), s) for s in stop if s in text]
    if found:
        at, string = min(found)
        # The tokens up to the one that completed the string (those after are padding).
        spelled = next(n + 1 for n in range(len(kept)) if string in tokenizer.decode(kept[: n + 1], skip_special_tokens=True))
        return Answer(kept[:spelled], text[:at], stop_string=string)
    if end is not None:
        return Answer(kept, text, stop_token=tokenizer.decode(kept[-1:], skip_special_tokens=False))
    return Answer(kept, text)


def token_logprobs(tokenizer: Any, logits: Sequence[Any], row: int, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Per generated token of `row`: its log-probability and the `top` most likely tokens'.

    Args:
        logits: `generate`'s raw logits (`output_logits=True`), one (rows, vocabulary) tensor per
            generated position.
    """
    import torch

    def text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    entries = []
    for step, token in zip(logits, tokens):
        logprobs = torch.log_softmax(step[row].float(), dim=-1)
        best = torch.topk(logprobs, top) if top else None
        alternatives = tuple((text(int(i)), float(v)) for v, i in zip(best.values, best.indices)) if best is not None else ()
        entries.append(TokenLogprob(text(int(token)), float(logprobs[token]), alternatives))
    return entries
