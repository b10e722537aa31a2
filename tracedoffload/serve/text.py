"""From token ids to the text a client sees, step by step: what is safe to send now, and where a
stop string ends the answer.

A token's bytes can be half a character (the decoder then shows U+FFFD until the rest arrives),
and a stop string can arrive split over steps: the text that could still turn out to be either
is held back until the next step says.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class TextStream:
    """Decodes a growing list of token ids; `advance(tokens)` returns the new text safe to send and
    whether a stop string ended the answer (the text up to it, without it, is all that is sent)."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.sent = ""  # the text sent so far
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    def advance(self, tokens: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop)
            if at != -1:
                text, final = text[:at], True
                self.stopped = True
        if not final:
            while text.endswith(_INCOMPLETE):
                text = text[:-1]
            text = text[: max(len(self.sent), len(text) - self._hold)]
        if not text.startswith(self.sent):  # a re-tokenization changed earlier text: send what follows
            text = self.sent + text[len(self.sent) :]
        new, self.sent = text[len(self.sent) :], text
        return new
