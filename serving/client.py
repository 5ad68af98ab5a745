"""`EngineClient`: the HTTP server's handle on an engine that runs in its own process.

Data flow: `create_app(client, codec, name)` calls what it calls on an in-process
`serving.engine.Engine` (`info`, `alive`, `generate`, `cancel`, `adapter_names`,
`load_adapter`, `unload_adapter`, `metrics_text`); the client turns those calls into
messages (serving/ipc.py) to the engine process (serving/engine_process.py), which it
spawns. A receiver thread reads the engine's messages: each `Outputs` (one per engine flush)
is split into the requests' `AsyncStream`s with one `call_soon_threadsafe` per event loop,
and each `Reply` settles its RPC's future.

The receiver also watches the engine process itself (its `sentinel` in the same poll as
the socket): if it dies, every request in flight and every pending RPC fails with
`Unavailable` (503) at once, `alive` turns false and the `when_dead` callback runs, so that
the server stops (with a non-zero status: a supervisor restarts both).

The HTTP server never touches JAX: this process imports the serving modules but builds no
device array; the engine process alone initializes a backend ("spawn", not "fork").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import zmq

from serving import engine_process, ipc
from serving.engine import AsyncStream, Output
from serving.requests import EngineInfo, GenerationRequest, InvalidRequest, Unavailable

log = logging.getLogger("serving.client")
POLL_MS = 200          # how often the receiver looks for close(); death wakes it at once


class EngineStartError(RuntimeError):
    """The engine process could not start; `exit_code` is what the command should return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class EngineClient:
    """Spawns the engine process for parsed `serve` flags; `wait_ready()` before serving."""

    def __init__(self, args):
        self._dir = tempfile.mkdtemp(prefix="slora-jax-")
        input_ep, output_ep = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._ctx = zmq.Context()
        self._push = self._bind(zmq.PUSH, input_ep)
        self._pull = self._bind(zmq.PULL, output_ep)
        self.process = multiprocessing.get_context("spawn").Process(
            target=engine_process.main, args=(args, input_ep, output_ep, os.getpid()),
            name="slora-jax-engine", daemon=True)
        _start_without_sigint(self.process)
        self.ready: ipc.Ready | None = None
        self.failed: ipc.Failed | None = None
        self._death_callback: Callable[[], None] | None = None
        self.died = False                     # the engine process ended without being asked
        self._lock = threading.Lock()         # _streams, _calls, _dead
        self._send_lock = threading.Lock()    # the input socket (zmq sockets are not thread-safe)
        self._streams: dict[str, AsyncStream] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._dead = False
        self._closing = False
        self._closed = False
        self._started = threading.Event()     # ready, failed or dead
        self._stop = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="engine-client",
                                          daemon=True)
        self._receiver.start()

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self._ctx.socket(kind)
        # No high-water mark: a send never blocks the event loop. Without a peer (the engine
        # is gone) a send fails at once (zmq.Again), which `_send` turns into a 503.
        s.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(endpoint)
        return s

    # -- start-up and shutdown ---------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> ipc.Ready:
        """Block until the engine is warm and serving; raises EngineStartError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short waits, so that a signal handler of the main thread runs meanwhile.
        while not self._started.wait(0.2):
            if deadline is not None and time.monotonic() > deadline:
                raise EngineStartError(f"the engine did not start in {timeout:g}s", 1)
        if self.ready is not None:
            return self.ready
        if self.failed is not None:
            raise EngineStartError(self.failed.message, 2)
        raise EngineStartError(f"the engine process exited with status "
                               f"{self.process.exitcode} while starting", 1)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process (Shutdown, then SIGTERM, then SIGKILL) and clean up."""
        if self._closed:
            return
        self._closing = True
        p = self.process
        if p.is_alive() and self.ready is not None and not self._dead:
            try:
                self._send(ipc.Shutdown())
                p.join(timeout)
            except Unavailable:
                pass
        for stop in (p.terminate, p.kill):
            if p.is_alive():
                stop()
                p.join(5)
        self._stop.set()
        self._receiver.join()
        self._fail_all(Unavailable("the engine stopped"))
        self._push.close()
        self._pull.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._closed = True

    def when_dead(self, fn: Callable[[], None]) -> None:
        """Call `fn` (on the receiver thread) once the engine process has died unasked; at
        once if it has already."""
        self._death_callback = fn
        if self.died:
            fn()

    # -- what the HTTP server calls ----------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self.ready.info

    @property
    def alive(self) -> bool:
        # The receiver thread sees the process end at once (its sentinel): no waitpid here.
        return self.ready is not None and not self._dead and not self._closing

    def generate(self, req: GenerationRequest) -> AsyncStream:
        """Submit from a running event loop. Refusals the engine decides (unknown adapter,
        prompt too long, queue full) arrive as the stream's first output."""
        stream = AsyncStream(self, asyncio.get_running_loop())
        stream.request_id = req.id
        try:
            data = ipc.encode(ipc.Submit.of(req))
        except (TypeError, OverflowError) as e:   # the HTTP layer's checks should make it rare
            raise InvalidRequest(f"the request cannot be sent to the engine: {e}") from None
        with self._lock:
            if self._dead or self._closing:
                raise Unavailable("the engine is not running")
            self._streams[req.id] = stream
        try:
            self._send_raw(data)
        except Unavailable:
            self._forget(req.id)
            raise
        return stream

    def cancel(self, request_id: str | None) -> None:
        if request_id is None or self._forget(request_id) is None:
            return                 # finished already: nothing to cancel in the engine
        try:
            self._send(ipc.Cancel(request_id))
        except Unavailable:
            pass

    async def adapter_names(self) -> list[str]:
        return await self._call("adapter_names")

    async def load_adapter(self, name: str, path: str) -> None:
        await self._call("load_adapter", name, path)

    async def unload_adapter(self, name: str) -> None:
        """Raises KeyError for an unknown name."""
        await self._call("unload_adapter", name)

    async def metrics_text(self) -> bytes:
        return await self._call("metrics_text")

    async def stats(self) -> dict:
        return await self._call("stats")

    async def evict_idle_adapters(self) -> int:
        return await self._call("evict_idle_adapters")

    # -- messages out --------------------------------------------------------------------------
    def _send(self, msg) -> None:
        self._send_raw(ipc.encode(msg))

    def _send_raw(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._push.send(data, zmq.NOBLOCK)
            except zmq.ZMQError:
                raise Unavailable("the engine is not running") from None

    def _forget(self, request_id: str) -> AsyncStream | None:
        with self._lock:
            return self._streams.pop(request_id, None)

    async def _call(self, method: str, *args) -> Any:
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._dead or self._closing:
                raise Unavailable("the engine is not running")
            call_id = next(self._call_ids)
            self._calls[call_id] = fut
        try:
            self._send(ipc.Call(call_id, method, list(args)))
        except Unavailable:
            with self._lock:
                self._calls.pop(call_id, None)
            raise
        return await fut

    # -- messages in (receiver thread) -----------------------------------------------------------
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(POLL_MS))
            self._drain()
            if self.process.sentinel in events and not self._dead:
                self._drain(linger_ms=50)          # what it sent just before it ended
                if not self._closing:
                    self._on_death()
                poller.unregister(self.process.sentinel)
                self._dead = True
                self._started.set()

    def _drain(self, linger_ms: int = 0) -> None:
        while self._pull.poll(linger_ms):
            while True:
                try:
                    raw = self._pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self._handle(ipc.decode_from_engine(raw))
                except Exception:  # noqa: BLE001 - this thread must keep watching the engine
                    log.exception("could not handle a message from the engine")

    def _handle(self, msg) -> None:
        if isinstance(msg, ipc.Outputs):
            by_channel: dict[Any, list] = {}
            with self._lock:
                for o in msg.items:
                    stream = (self._streams.pop(o.id, None) if o.final
                              else self._streams.get(o.id))
                    if stream is not None:     # None: cancelled meanwhile, nobody listens
                        by_channel.setdefault(stream.channel, []).append((stream, o.output()))
            for channel, items in by_channel.items():
                channel.deliver(items)
        elif isinstance(msg, ipc.Reply):
            with self._lock:
                fut = self._calls.pop(msg.call_id, None)
            if fut is not None:
                err = None if msg.error is None else ipc.rebuild(msg.error)
                _settle_threadsafe(fut, msg.value, err)
        elif isinstance(msg, ipc.Ready):
            self.ready = msg
            self._started.set()
        elif isinstance(msg, ipc.Failed):
            self.failed = msg
            self._started.set()

    def _on_death(self) -> None:
        self.process.join(1)                       # it has ended: this only reaps it
        code = self.process.exitcode
        self.died = self.ready is not None
        if self.ready is None:
            return                                 # wait_ready reports it
        log.error("the engine process exited (status %s); failing every request in flight",
                  code)
        self._fail_all(Unavailable(f"the engine process exited (status {code}); the server "
                                   "is restarting"))
        if self._death_callback is not None:
            self._death_callback()

    def _fail_all(self, err: Unavailable) -> None:
        with self._lock:
            self._dead = True
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        by_channel: dict[Any, list] = {}
        for s in streams:
            by_channel.setdefault(s.channel, []).append((s, Output([], [], error=err)))
        for channel, items in by_channel.items():
            channel.deliver(items)
        for fut in calls:
            _settle_threadsafe(fut, None, err)


def _settle_threadsafe(fut: asyncio.Future, value, err: BaseException | None) -> None:
    def settle():
        if fut.done():                  # the caller gave up (its task was cancelled)
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)
    try:
        fut.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:                # its loop is closed: nobody waits any more
        pass


def _start_without_sigint(process) -> None:
    """Start `process` with SIGINT ignored, as a child inherits it: a Ctrl-C while it starts
    up reaches the server, which stops it in order (engine_process.main keeps ignoring it)."""
    if threading.current_thread() is not threading.main_thread():
        process.start()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, old)
