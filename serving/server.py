"""`slora-jax serve` (or `python -m serving.server`): the OpenAI-compatible HTTP server.

The engine runs in a process of its own (serving/engine_process.py, spawned by
serving/client.py's `EngineClient`), which builds it from the same flags
(serving/bootstrap.py); this process serves HTTP (serving/app.py) and exits with the
engine (status 1 if it died). `--engine-in-process` runs the engine as a thread here.

    slora-jax serve --dummy tiny --dummy-adapters 100 --dummy-ranks 8,16
    slora-jax serve --model DIR --adapters ADAPTER_DIR --config configs/server/llama-7b.yaml

See serving/bootstrap.py for the flags and the YAML config, serving/app.py for the API.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from serving.app import ServerThread, bind_socket, create_app  # noqa: F401  (re-exported)
from serving.bootstrap import build, build_parser, resolve, warm

log = logging.getLogger("serving.server")
DEATH_GRACE_S = 1.0     # how long the server answers 503 after its engine died, before exiting


def main(argv: list[str] | None = None) -> int:
    """Serve: the engine in a process of its own (serving/engine_process.py) behind this
    process's HTTP server, so that framing responses never holds the step loop's GIL.

    Returns 0 after SIGINT/SIGTERM (both processes stopped), 2 for a configuration error, 1
    if the engine died (every request in flight got a 503 first; a supervisor restarts)."""
    args = build_parser().parse_args(argv)
    args.started_at = time.time()     # start-up phases count from here (serving.metrics)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import yaml
    try:
        resolve(args)        # a bad config fails here, before an engine process starts
    except (ValueError, OSError, yaml.YAMLError) as e:
        log.error("%s", e)
        return 2
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal; these
    # handlers turn that (or a signal during start-up) into a clean exit.
    import signal

    def stop(signum, frame):
        raise _Stopped(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    return (_main_in_process if args.engine_in_process else _main_split)(args)


def _main_split(args) -> int:
    """The engine in a process of its own, behind zmq (serving/client.py)."""
    from serving.client import EngineClient, EngineStartError
    from serving.protocol import TextCodec
    client = EngineClient(args)
    try:
        ready = client.wait_ready()
        log.info("engine process %d is ready", ready.pid)
        codec = TextCodec.from_dir(ready.tokenizer_dir)
        _serve(client, codec, ready.served_name, ready.server, ready.num_adapters, args,
               client.when_dead)
    except EngineStartError as e:
        log.error("%s", e)
        return e.exit_code
    except (ValueError, OSError) as e:      # the tokenizer, or the address to listen on
        log.error("%s", e)
        return 2
    except _Stopped as e:
        log.info("stopped by %s", e)
    finally:
        client.close()
    return 1 if client.died else 0


def _main_in_process(args) -> int:
    """The engine as a thread of this process (`--engine-in-process`)."""
    try:
        engine, codec, name, cfg = build(args)
    except (ValueError, OSError) as e:     # config, weights and adapter errors name their file
        log.error("%s", e)
        return 2
    ec = engine.ec
    log.info("model %s: %d pool pages of %d rows (%d tokens each), max_batch %d, context %d",
             name, ec.num_pages, ec.page_size, engine.layout.tokens_per_page, ec.max_batch,
             ec.max_context)
    failed = []

    def when_dead(exit_soon):
        engine.on_fatal = lambda e: (failed.append(e), exit_soon())
    try:
        warm(engine)
        engine.start()
        _serve(engine, codec, name, cfg["server"], len(engine.store.names()), args, when_dead)
    except _Stopped as e:
        log.info("stopped by %s", e)
    finally:
        engine.shutdown()
    return 1 if failed else 0


def api_key(args) -> str | None:
    """--api-key, else $SLORA_API_KEY; None (an open server) when neither is set."""
    return args.api_key or os.environ.get("SLORA_API_KEY") or None


def _serve(engine, codec, name: str, srv: dict, num_adapters: int, args, when_dead) -> None:
    """Bind and serve until a signal, or until shortly after the engine died: `when_dead`
    registers the callback that ends the server then."""
    import uvicorn

    app = create_app(engine, codec, name, default_max_tokens=srv["default_max_tokens"],
                     api_key=api_key(args))
    sock = bind_socket(srv["host"], int(srv["port"]))
    host, port = sock.getsockname()[:2]
    log.info("serving '%s' with %d adapters on http://%s:%d (OpenAI API under /v1)", name,
             num_adapters, host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=5))

    def exit_soon():
        # Answer 503 (/health too) a moment longer, so that requests already on their way
        # get a 503 rather than a reset connection; then exit, for a supervisor to restart.
        t = threading.Timer(DEATH_GRACE_S, setattr, (server, "should_exit", True))
        t.daemon = True
        t.start()
    when_dead(exit_soon)
    try:
        server.run(sockets=[sock])
    except _Stopped as e:
        log.info("stopped by %s", e)
    finally:
        sock.close()


class _Stopped(Exception):
    pass


if __name__ == "__main__":
    sys.exit(main())
