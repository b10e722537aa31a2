"""The one interface through which the offloader reports what it did and when.

The offloader calls a `Timeline` at every boundary: the start and end of a step (one forward
pass of the model, serving one sequence or a batch) and each layer's transfer, compute and
release. A step's start comes with the shape of the forward's input (rows, tokens per row) and,
when the model's KV cache says so, the tokens it held before the forward. It hands over markers, not durations: host-clock nanoseconds on the CPU path, CUDA
events on the GPU path, which a consumer resolves later, off the hot path. The tracing core is
such a consumer; `RecordingTimeline` keeps plain records for tests and benchmarks.

Contract: called on the model's thread, on the hot path. An implementation must be cheap (append
and return) and must never raise.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

TRANSFER = "transfer"
COMPUTE = "compute"
RELEASE = "release"
LAYER_KINDS = (TRANSFER, COMPUTE, RELEASE)
DRAFT = "draft"  # a forward of a speculative decoding's draft model, before the step that verifies it


class LayerRecord(NamedTuple):
    """One layer operation between two markers."""

    kind: str  # TRANSFER, COMPUTE or RELEASE (or DRAFT: a draft model's whole forward, layer -1)
    layer_index: int
    start: Any
    end: Any
    nbytes: int  # bytes copied (transfer) or device bytes given back (release); 0 for compute
    slot: int  # device slot used, -1 for a resident layer
    prefetched: bool  # transfer issued ahead of need (False: the compute asked for it on demand)


class Timeline:
    """Receives the offloader's boundaries; this base class drops them.

    `wants_markers`: whether the markers (host-clock readings, CUDA timing events) are wanted.
    A subclass that reads them keeps True; `NullTimeline`, the offloader's timeline when nothing
    listens, says False, and then no marker is taken at all (on CUDA, about a hundred timing
    events per token that nobody would read): the records carry None instead.
    """

    wants_markers = True

    def step_begin(self, marker: Any, rows: int = 1, length: int = 1, cached: int | None = None) -> None:
        """A forward pass of the model starts on an input of `rows` sequences of `length` tokens,
        after `cached` tokens in its KV cache (None: not known). Speculative decoding crops the
        cache after a verify; the next step's `cached` says how many drafted tokens were kept."""

    def layer(self, record: LayerRecord) -> None:
        """A layer transfer, compute or release was issued between two markers."""

    def step_end(self, marker: Any) -> None:
        """The forward pass ended."""


class NullTimeline(Timeline):
    """Nothing listens: boundaries are dropped and no markers are taken for them."""

    wants_markers = False


class RecordedStep(NamedTuple):
    start: Any
    end: Any
    records: list[LayerRecord]


class RecordingTimeline(Timeline):
    """Keeps the last `max_steps` steps as plain records (host-clock markers are ns integers)."""

    def __init__(self, max_steps: int = 4096) -> None:
        self.steps: collections.deque[RecordedStep] = collections.deque(maxlen=max_steps)
        self._records: list[LayerRecord] = []
        self._start: Any = None

    def step_begin(self, marker: Any, rows: int = 1, length: int = 1, cached: int | None = None) -> None:
        self._records = []
        self._start = marker

    def layer(self, record: LayerRecord) -> None:
        self._records.append(record)

    def step_end(self, marker: Any) -> None:
        self.steps.append(RecordedStep(self._start, marker, self._records))
        self._records = []

    def records(self, kind: str | None = None) -> list[LayerRecord]:
        """Every record of the kept steps, optionally of one kind."""
        return [r for step in self.steps for r in step.records if kind is None or r.kind == kind]
