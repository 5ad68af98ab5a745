"""The engine process: the device, scheduler, adapter store and step loop, behind zmq.

The server process (serving/server.py, through `serving.client.EngineClient`) spawns this
process with its parsed flags and two ipc endpoints. Here, `serving.bootstrap.build(args)` builds
the same `serving.engine.Engine` the server would run in-process, warms it up and starts
its thread; then a bridge connects it to the server (messages in serving/ipc.py):

    input socket  (PULL, main thread)  Submit / Cancel -> Engine.submit / cancel
                                       Call -> an RPC worker thread -> Reply
    output socket (PUSH, engine thread) ProcessChannel.deliver: one `Outputs` per flush
    reply socket  (PUSH, main thread and RPC workers, under a lock)  Ready, Failed, Reply,
                                       and the error of a request refused at submission

zmq sockets are not thread-safe, hence the output socket that only the engine thread
touches. This process leaves on `Shutdown`, on SIGTERM, when its parent dies (Linux's
PR_SET_PDEATHSIG, and a poll of the parent's pid), or when the engine loop fails (exit
status 1, after every request in flight has been answered 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import sys
import threading

import msgspec
import zmq

from serving import ipc

log = logging.getLogger("serving.engine_process")
POLL_MS = 200          # how often the bridge looks at its parent and its stop flags
LINGER_MS = 1000       # how long pending messages may take to leave at exit


class ProcessChannel:
    """Sends the outputs of one engine flush to the server as one `Outputs` message.

    Only the engine thread calls `deliver` (from `Engine._flush`), so it owns the socket."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock

    def deliver(self, items) -> None:
        self.sock.send(ipc.encode(ipc.Outputs([ipc.out_of(s.request_id, o) for s, o in items])))


class RemoteStream:
    """A request's stream inside the engine: where its outputs go, and how to cancel it."""

    __slots__ = ("engine", "channel", "request_id")

    def __init__(self, engine, channel: ProcessChannel):
        self.engine, self.channel, self.request_id = engine, channel, None

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)


class Bridge:
    """Acts on the server's messages; owns the reply socket (shared under a lock)."""

    def __init__(self, engine, inbox: zmq.Socket, replies: zmq.Socket, outputs: zmq.Socket,
                 parent_pid: int):
        self.engine, self.inbox, self.replies = engine, inbox, replies
        self.channel = ProcessChannel(outputs)
        self.parent_pid = parent_pid
        self._reply_lock = threading.Lock()
        # RPCs run off the input thread: an adapter load reads files for a while, and
        # submissions and cancellations must not wait behind it.
        self._workers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="engine-rpc")
        # Set by the SIGTERM handler: a plain flag, not an Event, whose lock a second signal
        # arriving while the handler holds it would wait on forever (handlers run in the
        # thread they interrupt).
        self.stop_requested = False
        self.fatal = threading.Event()

    def reply(self, msg) -> None:
        with self._reply_lock:
            self.replies.send(ipc.encode(msg))

    def run(self) -> None:
        """The input loop (main thread), until Shutdown, a stop signal, the parent's death or
        a failed engine loop."""
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        while not (self.stop_requested or self.fatal.is_set()):
            if poller.poll(POLL_MS):
                while True:
                    try:
                        raw = self.inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = ipc.decode_to_engine(raw)
                    except msgspec.DecodeError as e:
                        self.unreadable(raw, e)
                        continue
                    if not self.handle(msg):
                        return
            if os.getppid() != self.parent_pid:
                log.warning("the server process is gone; stopping")
                return

    def handle(self, msg) -> bool:
        """Act on one message; False means stop."""
        if isinstance(msg, ipc.Submit):
            stream = RemoteStream(self.engine, self.channel)
            try:
                self.engine.submit(msg.request(), stream)
            except Exception as e:  # noqa: BLE001 - a refused request is answered, never fatal
                self.reply(ipc.Outputs([ipc.Out(msg.id, [], [], error=ipc.error_of(e))]))
        elif isinstance(msg, ipc.Cancel):
            self.engine.cancel(msg.id)
        elif isinstance(msg, ipc.Call):
            self._workers.submit(self.call, msg)
        elif isinstance(msg, ipc.Shutdown):
            return False
        return True

    def unreadable(self, raw: bytes, e: Exception) -> None:
        answer = ipc.refusal(raw, e)
        if answer is None:
            log.error("dropped an unreadable message from the server: %s", e)
        else:
            self.reply(answer)

    def call(self, msg: ipc.Call) -> None:
        """One RPC: the Engine method of that name, as the server would call it in-process."""
        try:
            value = getattr(self.engine, msg.method)(*msg.args)
            if asyncio.iscoroutine(value):
                value = asyncio.run(value)
            self.reply(ipc.Reply(msg.call_id, value))
        except Exception as e:  # noqa: BLE001 - the caller gets the error
            self.reply(ipc.Reply(msg.call_id, error=ipc.error_of(e)))

    def close(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)


def stop_on_sigterm(bridge: Bridge) -> None:
    """SIGTERM (from the server, or PR_SET_PDEATHSIG) ends `bridge.run` within POLL_MS,
    however many arrive at once."""
    def handler(*_):
        bridge.stop_requested = True
    signal.signal(signal.SIGTERM, handler)


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when the parent dies, however it dies (Linux); the bridge also polls."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:       # it died before the prctl
        os._exit(1)


def main(args, input_endpoint: str, output_endpoint: str, parent_pid: int) -> None:
    """The engine process's entry point (a multiprocessing "spawn" target)."""
    # Its own process group: the terminal's Ctrl-C and a signal to the server's group reach
    # the server only, which then stops this process in order (Shutdown, then SIGTERM).
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # tqdm's default lock (the warm-up's progress bar) is a multiprocessing semaphore, named
    # in a spawned process: killed, this process would leave it to the resource tracker,
    # which warns about it on the terminal. A thread lock is all the bar needs here.
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    ctx = zmq.Context()
    socks = []

    def connect(kind: int, endpoint: str) -> zmq.Socket:
        s = ctx.socket(kind)
        # No high-water mark: a send never blocks the engine thread, even with the server
        # gone (then this process is about to leave anyway).
        s.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, LINGER_MS)
        s.connect(endpoint)
        socks.append(s)
        return s

    inbox = connect(zmq.PULL, input_endpoint)
    replies = connect(zmq.PUSH, output_endpoint)
    outputs = connect(zmq.PUSH, output_endpoint)
    code = 0
    try:
        code = _serve(args, inbox, replies, outputs, parent_pid)
    finally:
        for s in socks:
            s.close()
        ctx.term()
        if os.getppid() != parent_pid:
            # The server died without cleaning up: its endpoints' folder is left to us.
            shutil.rmtree(os.path.dirname(input_endpoint.removeprefix("ipc://")),
                          ignore_errors=True)
    sys.exit(code)


def _serve(args, inbox, replies, outputs, parent_pid: int) -> int:
    from serving.bootstrap import build, log as cli_log, warm
    try:
        engine, _, name, cfg = build(args)
    except (ValueError, OSError) as e:     # config, weights and adapter errors name their file
        replies.send(ipc.encode(ipc.Failed(str(e))))
        return 2
    ec = engine.ec
    cli_log.info("model %s: %d pool pages of %d rows (%d tokens each), max_batch %d, context %d",
                 name, ec.num_pages, ec.page_size, engine.layout.tokens_per_page, ec.max_batch,
                 ec.max_context)
    warm(engine)
    bridge = Bridge(engine, inbox, replies, outputs, parent_pid)
    # From here on SIGTERM (from the server, or PR_SET_PDEATHSIG) is a clean stop; before,
    # its default action ends a process that holds nothing worth saving.
    stop_on_sigterm(bridge)
    engine.on_fatal = lambda e: bridge.fatal.set()     # after every request got its 503
    engine.start()
    bridge.reply(ipc.Ready(os.getpid(), engine.info, name, args.tokenizer or args.model,
                           cfg["server"], len(engine.store.names())))
    try:
        bridge.run()
    finally:
        engine.shutdown()
        bridge.close()
    return 1 if bridge.fatal.is_set() else 0
