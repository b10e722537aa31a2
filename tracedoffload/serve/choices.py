"""The choices of one request (`n` samples of its prompt): each is its own sequence in the engine,
with its own place in line, its own output, its own text so far (stop strings applied) and its
own span. Here they are followed to their end, together: collected for a plain answer, or merged
into one stream of events, each event naming its choice's index.

Closing (`close_all`) takes every choice out of the engine or the line, whether it finished, the
client left, or the engine failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from tracedoffload.serve.engine import Output, RequestNotes
from tracedoffload.serve.text import TextStream


@dataclasses.dataclass
class Choice:
    index: int
    ticket: Any
    outputs: AsyncIterator[Output]
    text: TextStream
    notes: RequestNotes
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # None until it ends
    logprobs: list[Any] = dataclasses.field(default_factory=list)  # per token, when the request asked
    reported: int = 0  # log-probability entries already streamed
    reported_chars: int = 0  # completions: the length of their tokens' text (the next text_offset)

    def advance(self, output: Output) -> str:
        """Take the engine's latest output; returns the text that is new (stop strings held back)."""
        self.tokens = output.tokens
        if output.logprobs is not None:
            self.logprobs = output.logprobs
        new = self.text.advance(output.tokens, final=output.finished)
        if self.text.stopped:
            self.finish_reason = self.notes.finish_reason = "stop"
        elif output.finished:
            self.finish_reason = output.finish_reason or "length"
        return new


async def collect(choice: Choice) -> None:
    """Follow one choice to its end (a stop string ends it early); its place is given up as soon
    as it ends, so that a sibling waiting in line can have it."""
    async for output in choice.outputs:
        choice.advance(output)
        if choice.finish_reason is not None:
            await choice.outputs.aclose()
            return


async def events(choices: list[Choice]) -> AsyncIterator[tuple[Choice, str, bool]]:
    """(choice, new text, first event of it) as each choice advances, interleaved in the order
    the engine delivers; a choice's last event has its `finish_reason` set. Raises what a
    choice's output raised (an engine failure)."""
    queue: asyncio.Queue[tuple[Choice, Output | BaseException | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for output in choice.outputs:
                await queue.put((choice, output))
        except Exception as error:  # handed to the reader, which raises it
            await queue.put((choice, error))
        else:
            await queue.put((choice, None))

    pumps = [asyncio.ensure_future(pump(choice)) for choice in choices]
    started: set[int] = set()
    try:
        while any(choice.finish_reason is None for choice in choices):
            choice, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if choice.finish_reason is not None:
                continue  # ended already (a stop string); its last outputs are not wanted
            if item is None:  # its outputs ended without a last one: nothing more will come
                choice.finish_reason = "length"
                continue
            new = choice.advance(item)
            first = choice.index not in started
            started.add(choice.index)
            if new or first or choice.finish_reason is not None:
                yield choice, new, first
            if choice.finish_reason is not None:
                pumps[choice.index].cancel()  # out of the engine now, not at its max_tokens
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def close_all(choices: list[Choice], admission: Any) -> None:
    """Out of the engine (cancelled if unfinished) and out of line, every one of them."""
    for choice in choices:
        await choice.outputs.aclose()
        admission.release(choice.ticket)
