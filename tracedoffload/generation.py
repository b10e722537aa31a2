"""Greedy generation, timed and optionally traced: one prompt (what `tracedoffload run` and the
benchmarks run) or a batch of prompts in one `generate`.

A prompt goes through the tokenizer's chat template when it has one (a user turn, after an
optional system turn), so an instruction-tuned model answers it and stops at its end-of-turn
token; `raw=True` sends the text as it is. Generation stops at the model's end-of-sequence ids
(its generation config's, which transformers' GGUF loader sets to the end-of-turn token) or at
`max_new_tokens`, and says which.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tracedoffload._exceptions import TracedOffloadError
from tracedoffload.answer import TokenLogprob, check_stop, end_of_answer, token_logprobs

if TYPE_CHECKING:  # annotations only: generating needs no OpenTelemetry SDK unless traced
    from tracedoffload.decoding import Decoding
    from tracedoffload.speculation import Speculation
    from tracedoffload.tracing.session import TracingSession

# OpenAI's and the GenAI semantic conventions' finish reasons.
FINISH_STOP = "stop"  # the model emitted an end-of-sequence (end-of-turn) token
FINISH_LENGTH = "length"  # max_new_tokens was reached
FINISH_INTERRUPTED = "interrupted"  # Ctrl-C (SIGINT) stopped it at a step boundary


class Generation(NamedTuple):
    """One generation's counts, wall time, decoded new text and why it stopped."""

    prompt_tokens: int
    generated_tokens: int
    seconds: float
    text: str
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH or FINISH_INTERRUPTED
    stop_token: str | None = None  # the end-of-sequence token that stopped it, as text
    stop_string: str | None = None  # the caller's stop string that stopped it
    logprobs: tuple[TokenLogprob, ...] | None = None  # per generated token, when asked for


def encode_prompt(tokenizer: Any, prompt: str, *, system: str | None = None, raw: bool = False) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of shape (1, n) for one prompt.

    Args:
        tokenizer: a transformers tokenizer, or a `ByteTokenizer`.
        prompt: the user's text.
        system: a system turn before it (chat templates only).
        raw: send `prompt` as plain text even when the tokenizer has a chat template.

    Raises:
        TracedOffloadError: `system` given where no chat template applies (it would be dropped
            silently), or the prompt encodes to no tokens (the model would fail on an empty input).
    """
    if uses_chat_template(tokenizer, raw):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        if system is not None:
            reason = "--raw sends the prompt as plain text" if raw else f"{type(tokenizer).__name__} has no chat template"
            raise TracedOffloadError(f"system={system!r} needs a chat template: {reason}; put the instruction in the prompt instead")
        encoded = tokenizer(prompt, return_tensors="pt")
    if encoded["input_ids"].shape[-1] == 0:
        raise TracedOffloadError(f"prompt={prompt!r} encodes to no tokens with {type(tokenizer).__name__}; give a non-empty prompt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def uses_chat_template(tokenizer: Any, raw: bool = False) -> bool:
    """Whether a prompt goes through the tokenizer's chat template."""
    return not raw and bool(getattr(tokenizer, "chat_template", None))


def generate_once(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    session: TracingSession | None = None,
    model_name: str = "",
    *,
    system: str | None = None,
    raw: bool = False,
    ignore_eos: bool = False,
    interruptible: bool = False,
    speculation: Speculation | None = None,
    decoding: Decoding | None = None,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` tokens after `prompt` (greedy unless `decoding` samples),
    timed; traced as one generation when a tracing `session` is given.

    Args:
        ignore_eos: generate exactly `max_new_tokens` (end-of-sequence never stops it): a
            benchmark needs the same token count in every run.
        interruptible: a first Ctrl-C (SIGINT) ends the generation cleanly after the step in
            progress, with what it made so far (`FINISH_INTERRUPTED`); a second one raises
            KeyboardInterrupt as usual. Main thread only (where Python delivers signals).
        speculation: draft tokens for the model to verify (`speculation.py`); the output is the
            same, in fewer offloaded forwards when drafts are kept. A draft model's forwards are
            traced under the steps verifying them.
        decoding: how tokens are chosen (`decoding.py`); None: greedy.
        stop: strings that end the answer (not part of its text); needs a transformers tokenizer.
        logprobs: report each token's log-probability and this many alternatives'; None: none.

    Blocking: waits for the device before stopping the clock.

    Raises:
        TracedOffloadError: see `encode_prompt`.
    """
    choices = dict(ignore_eos=ignore_eos, interruptible=interruptible, speculation=speculation, decoding=decoding, stop=stop, logprobs=logprobs)
    return _generate(model, tokenizer, [prompt], max_new_tokens, session, model_name, system=system, raw=raw, **choices)[0]


def generate_batched(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    session: TracingSession | None = None,
    model_name: str = "",
    *,
    system: str | None = None,
    raw: bool = False,
    samples: int = 1,
    decoding: Decoding | None = None,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    interruptible: bool = False,
) -> list[Generation]:
    """Generate after every prompt in one batched `generate` (left-padded), `samples` answers
    per prompt: each forward serves every sequence, which is what spreads an offloaded layer's
    copy over the batch. Traced as one generation per answer, each with its own length and
    finish reason. Answers come prompt by prompt, a prompt's samples together.

    Samples of one prompt share each forward from the first: transformers' `generate` repeats
    the prompt `samples` times before the prefill (`num_return_sequences`), so the prefill
    computes it once per sample, in one forward that streams the weights once.

    A sequence that reaches an end-of-sequence token or a stop string stops there
    (`FINISH_STOP`; the batch runs on until its last sequence stops, and what a finished row is
    fed after is not its output); the others end at `max_new_tokens` (`FINISH_LENGTH`), or
    `FINISH_INTERRUPTED`. `seconds` is the batch's wall time. Other arguments: `generate_once`.

    Raises:
        TracedOffloadError: no prompts, or a prompt as `encode_prompt` refuses it.
    """
    if not prompts:
        raise TracedOffloadError("prompts=[] : give at least one prompt")
    choices = dict(samples=samples, decoding=decoding, stop=stop, logprobs=logprobs, interruptible=interruptible)
    return _generate(model, tokenizer, prompts, max_new_tokens, session, model_name, system=system, raw=raw, **choices)


def _generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    session: TracingSession | None,
    model_name: str,
    *,
    system: str | None,
    raw: bool,
    samples: int = 1,
    ignore_eos: bool = False,
    interruptible: bool = False,
    speculation: Speculation | None = None,
    decoding: Decoding | None = None,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
) -> list[Generation]:
    stop = check_stop(stop, tokenizer)
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask, lengths = _left_padded(tokenizer, prompts, system, raw)
    width = input_ids.shape[1]
    stop_ids = set() if ignore_eos else eos_ids(model)
    pad = pad_id(tokenizer)
    limits: dict[str, Any] = {"eos_token_id": sorted(stop_ids) or None}
    if ignore_eos:
        # eos_token_id=None overrides the model's generation config; min_new_tokens also masks
        # eos should a generation config put it back.
        limits["min_new_tokens"] = max_new_tokens
    if samples > 1:
        limits["num_return_sequences"] = samples
    if stop:
        limits.update(stop_strings=list(stop), tokenizer=tokenizer)
    if logprobs is not None:
        limits.update(return_dict_in_generate=True, output_logits=True)
    interrupt = StopOnInterrupt() if interruptible else None
    rows = [length for length in lengths for _ in range(samples)]
    with contextlib.ExitStack() as stack:
        speculative = stack.enter_context(speculation.applied(model)) if speculation is not None else {}
        choosing = decoding.generate_kwargs(width) if decoding is not None else {"do_sample": False}
        if session is not None and speculation is not None and speculation.draft_model is not None:
            stack.callback(session.trace_draft(speculation.draft_model))
        if session is not None and speculation is not None and speculation.early_exit_layers is not None:
            stack.callback(session.trace_early_exit(model))
        _synchronize(device)
        if session is None:
            traced: Any = contextlib.nullcontext([None] * len(rows))
        elif len(rows) == 1:  # one generation: its steps keep the single-sequence shape
            traced = _as_list(session.generation(model_name, rows[0], max_new_tokens))
        else:
            traced = session.generations(model_name, rows, max_new_tokens)
        started = time.perf_counter()
        with torch.inference_mode(), traced as handles, interrupt or contextlib.nullcontext():
            output = model.generate(
                input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([interrupt] if interrupt else []),
                **limits,
                **speculative,
                **choosing,
            )
            sequences = output.sequences if logprobs is not None else output
            answers = [end_of_answer(tokenizer, sequences[row, width:].tolist(), stop_ids, stop) for row in range(len(rows))]
            reasons = [FINISH_STOP if a.stopped else FINISH_INTERRUPTED if interrupt and interrupt.requested else FINISH_LENGTH for a in answers]
            for handle, answer, reason in zip(handles, answers, reasons):
                if handle is not None:
                    handle.output_tokens, handle.finish_reason = len(answer.tokens), reason
        _synchronize(device)
        seconds = time.perf_counter() - started
    generations = []
    for row, (length, answer, reason) in enumerate(zip(rows, answers, reasons)):
        entries = tuple(token_logprobs(tokenizer, output.logits, row, answer.tokens, logprobs)) if logprobs is not None else None
        generations.append(Generation(length, len(answer.tokens), seconds, answer.text, reason, answer.stop_token, answer.stop_string, entries))
    return generations


def _left_padded(tokenizer: Any, prompts: list[str], system: str | None, raw: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The prompts' ids, left-padded to one width, their attention mask, and their lengths."""
    encoded = [encode_prompt(tokenizer, prompt, system=system, raw=raw)["input_ids"][0] for prompt in prompts]
    lengths = [len(ids) for ids in encoded]
    width = max(lengths)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask, lengths


@contextlib.contextmanager
def _as_list(generation: Any) -> Iterator[list[Any]]:
    with generation as handle:
        yield [handle]


class StopOnInterrupt(StoppingCriteria):
    """A stopping criterion that a first SIGINT turns on; as a context manager, it installs its
    SIGINT handler for the block and puts the previous one back after (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.requested = True
        # A second Ctrl-C is the usual KeyboardInterrupt: a step that never ends can still be left.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch's short rows and a finished row's steps: the tokenizer's pad
    token, else its end-of-sequence token, else 0."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def eos_ids(model: torch.nn.Module) -> set[int]:
    """The ids that end a generation: the model's generation config's, as transformers reads them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
