"""Per-request output streams and the channels the engine delivers them through.

The engine thread collects each loop iteration's outputs and hands them over
once per channel (`Engine._flush`): an event loop's `AsyncStream`s in one
`call_soon_threadsafe`, blocking `SyncStream`s through their queues, or a link
to another process (`serving.engine_process`). No JAX here: the HTTP side
imports this without a device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from typing import Any

from serving.requests import RequestError


@dataclasses.dataclass
class Output:
    """One step's result for one request."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    error: RequestError | None = None
    num_prompt_tokens: int = 0


class LoopChannel:
    """Delivers the outputs of one flush to the `AsyncStream`s of one event loop, in one
    `call_soon_threadsafe` (not one wake-up per token per stream). Channels of the same
    loop compare equal, so a flush groups by loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def __eq__(self, other):
        return isinstance(other, LoopChannel) and other.loop is self.loop

    def __hash__(self):
        return id(self.loop)

    def deliver(self, items: list[tuple[Any, Output]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:        # the loop is closed: nobody listens any more
            pass


class QueueChannel:
    """Delivers outputs to blocking `SyncStream`s."""

    def deliver(self, items: list[tuple[Any, Output]]) -> None:
        for stream, out in items:
            stream.put(out)


class AsyncStream:
    """Per-request async iterator of `Output`s; raises the request's `RequestError` if it fails.

    `canceller` is whoever takes the cancellation (an `Engine`, or a client of an engine in
    another process): anything with `cancel(request_id)`."""

    def __init__(self, canceller, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = canceller, loop
        self.channel = LoopChannel(loop)
        self._q: asyncio.Queue[Output] = asyncio.Queue()
        self.request_id: str | None = None
        self.done = False

    def push(self, out: Output) -> None:
        """Called on the stream's event loop."""
        self._q.put_nowait(out)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        if self.done:
            raise StopAsyncIteration
        out = await self._q.get()
        if out.error is not None:
            self.done = True
            raise out.error
        if out.finish_reason is not None:
            self.done = True
        return out

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.engine.cancel(self.request_id)


_QUEUE_CHANNEL = QueueChannel()


class SyncStream:
    """Blocking stream for scripts and tests."""

    channel = _QUEUE_CHANNEL

    def __init__(self, engine):
        self.engine = engine
        self._q: queue.Queue[Output] = queue.Queue()
        self.request_id: str | None = None

    def put(self, out: Output) -> None:
        self._q.put(out)

    def get(self, timeout: float | None = 60.0) -> Output:
        return self._q.get(timeout=timeout)

    def result(self, timeout: float = 120.0) -> tuple[list[int], list[float], str]:
        """All tokens, logprobs and the finish reason; raises the request's error."""
        toks, lps = [], []
        deadline = time.monotonic() + timeout
        while True:
            out = self.get(max(0.01, deadline - time.monotonic()))
            if out.error is not None:
                raise out.error
            toks += out.token_ids
            lps += out.logprobs
            if out.finish_reason is not None:
                return toks, lps, out.finish_reason

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)


def _deliver(items: list[tuple[AsyncStream, Output]]) -> None:
    for stream, out in items:
        stream.push(out)


