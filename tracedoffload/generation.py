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
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tracedoffload._exceptions import TracedOffloadError

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
) -> Generation:
    """Greedy-generate up to `max_new_tokens` tokens after `prompt`, timed; traced as one
    generation when a tracing `session` is given.

    Args:
        ignore_eos: generate exactly `max_new_tokens` (end-of-sequence never stops it): a
            benchmark needs the same token count in every run.
        interruptible: a first Ctrl-C (SIGINT) ends the generation cleanly after the step in
            progress, with what it made so far (`FINISH_INTERRUPTED`); a second one raises
            KeyboardInterrupt as usual. Main thread only (where Python delivers signals).
        speculation: draft tokens for the model to verify (`speculation.py`); the output is the
            same, in fewer offloaded forwards when drafts are kept. A draft model's forwards are
            traced under the steps verifying them.
        decoding: sampled instead of greedy (`decoding.py`); None: greedy.

    Blocking: waits for the device before stopping the clock.

    Raises:
        TracedOffloadError: see `encode_prompt`.
    """
    device = model.get_input_embeddings().weight.device
    encoded = encode_prompt(tokenizer, prompt, system=system, raw=raw)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    stop_ids = set() if ignore_eos else eos_ids(model)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    limits: dict[str, Any] = {"eos_token_id": sorted(stop_ids) or None}
    if ignore_eos:
        # eos_token_id=None overrides the model's generation config; min_new_tokens also masks
        # eos should a generation config put it back.
        limits["min_new_tokens"] = max_new_tokens
    interrupt = StopOnInterrupt() if interruptible else None
    with contextlib.ExitStack() as stack:
        speculative = stack.enter_context(speculation.applied(model)) if speculation is not None else {}
        choosing = decoding.generate_kwargs() if decoding is not None else {"do_sample": False}
        if session is not None and speculation is not None and speculation.draft_model is not None:
            stack.callback(session.trace_draft(speculation.draft_model))
        if session is not None and speculation is not None and speculation.early_exit_layers is not None:
            stack.callback(session.trace_early_exit(model))
        _synchronize(device)
        traced = session.generation(model_name, input_ids.shape[1], max_new_tokens) if session is not None else contextlib.nullcontext()
        started = time.perf_counter()
        with torch.inference_mode(), traced as handle, interrupt or contextlib.nullcontext():
            output = model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([interrupt] if interrupt else []),
                **limits,
                **speculative,
                **choosing,
            )
            new_tokens = output[0, input_ids.shape[1] :]
            stopped = new_tokens.numel() > 0 and int(new_tokens[-1]) in stop_ids
            finish_reason = FINISH_STOP if stopped else FINISH_INTERRUPTED if interrupt and interrupt.requested else FINISH_LENGTH
            if handle is not None:
                handle.output_tokens = new_tokens.numel()
                handle.finish_reason = finish_reason
        _synchronize(device)
        seconds = time.perf_counter() - started
    stop_token = tokenizer.decode([int(new_tokens[-1])], skip_special_tokens=False) if stopped else None
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return Generation(input_ids.shape[1], new_tokens.numel(), seconds, text, finish_reason, stop_token)


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
) -> list[Generation]:
    """Greedy-generate after every prompt in one batched `generate` (left-padded): each forward
    serves every sequence, which is what spreads an offloaded layer's copy over the batch. Traced
    as one generation per prompt, each with its own length and finish reason.

    A sequence that reaches an end-of-sequence token stops there (`FINISH_STOP`; the batch runs
    on until its last sequence stops, and what a finished row is fed after is not its output);
    the others end at `max_new_tokens` (`FINISH_LENGTH`). `seconds` is the batch's wall time.

    Raises:
        TracedOffloadError: no prompts, or a prompt as `encode_prompt` refuses it.
    """
    if not prompts:
        raise TracedOffloadError("prompts=[] : give at least one prompt")
    device = model.get_input_embeddings().weight.device
    encoded = [encode_prompt(tokenizer, prompt, system=system, raw=raw)["input_ids"][0] for prompt in prompts]
    lengths = [len(ids) for ids in encoded]
    width = max(lengths)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    stop_ids = eos_ids(model)
    _synchronize(device)
    traced = session.generations(model_name, lengths, max_new_tokens) if session is not None else contextlib.nullcontext([None] * len(prompts))
    started = time.perf_counter()
    with torch.inference_mode(), traced as handles:
        output = model.generate(
            input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(stop_ids) or None,
        )
        results = []
        for row, handle in enumerate(handles):
            new_tokens = output[row, width:].tolist()
            end = next((n + 1 for n, token in enumerate(new_tokens) if token in stop_ids), None)
            kept = new_tokens[:end] if end is not None else new_tokens
            finish_reason = FINISH_STOP if end is not None else FINISH_LENGTH
            if handle is not None:
                handle.output_tokens, handle.finish_reason = len(kept), finish_reason
            results.append((kept, finish_reason))
    _synchronize(device)
    seconds = time.perf_counter() - started
    return [
        Generation(
            length,
            len(kept),
            seconds,
            tokenizer.decode(kept, skip_special_tokens=True),
            finish_reason,
            tokenizer.decode(kept[-1:], skip_special_tokens=False) if finish_reason == FINISH_STOP else None,
        )
        for length, (kept, finish_reason) in zip(lengths, results)
    ]


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


def eos_ids(model: torch.nn.Module) -> set[int]:
    """The ids that end a generation: the model's generation config's, as transformers reads them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
