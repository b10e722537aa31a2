"""Graceful drain: uvicorn's server, with SIGTERM (and SIGINT) turned into a drain.

uvicorn on a signal closes its listening socket at once (a load balancer's next request meets a
refused connection, not a 503) and re-raises the signal after shutting down (the exit status is
then the signal's, not 0). Here the first signal starts a drain instead:

1. `/ready` answers 503 at once, and new requests get 503 (the engine's `begin_drain`), while the
   socket stays open, so a load balancer sees the server leave its pool;
2. requests in flight finish, for up to `drain_timeout_s`; at that deadline those left end at
   once with the finish reason `error` (the engine's `cut_off`);
3. then uvicorn's own shutdown (answers being sent are finished), and the caller flushes spans
   and metrics and exits 0.

A second signal stops at once (uvicorn's forced exit).
"""

from __future__ import annotations

import asyncio
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from tracedoffload.logs import get_logger

log = get_logger("tracedoffload.serve")

POLL_S = 0.05
CUT_OFF_GRACE_S = 5.0  # after the cut-off, how long the answers being ended may take to be sent


class DrainingServer(uvicorn.Server):
    """A uvicorn server over `engine` that drains on SIGTERM / SIGINT."""

    def __init__(self, config: uvicorn.Config, engine: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.drained: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called from the signal handler, on the loop's thread between its callbacks. The signal
        # is not recorded for uvicorn to re-raise: the exit is ours, and 0.
        if self.engine.draining or self._loop is None:
            self.force_exit = self.should_exit = True
            return
        self.engine.begin_drain()
        log.info("serve.draining", signal=signal.Signals(sig).name, in_flight=self.engine.in_flight, drain_timeout_s=self.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drained = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Wait for the requests in flight (up to the timeout), cut off the rest, then stop."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self.engine.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        left = self.engine.in_flight
        if left:
            log.warning("serve.drain_cut_off", requests=left, drain_timeout_s=self.drain_timeout_s, note="they end with finish reason error")
            self.engine.cut_off()
            grace = time.monotonic() + CUT_OFF_GRACE_S
            while self.engine.in_flight and time.monotonic() < grace:
                await asyncio.sleep(POLL_S)
        log.info("serve.drained", cut_off=left)
        self.should_exit = True
