"""The `slora-jax` command line: `generate` (offline batch generation) and `serve`.

    slora-jax generate --model DIR [--adapter NAME=DIR ...] --requests IN.jsonl --out OUT.jsonl
    slora-jax serve ...            (see `slora-jax serve --help`)

Both drive the serving engine (serving/generate.py, serving/server.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("slora_jax")


def build_parser() -> argparse.ArgumentParser:
    from serving.generate import add_parser
    p = argparse.ArgumentParser(prog="slora-jax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP server", add_help=False)
    s.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if argv and argv[0] == "serve":
        from serving.server import main as serve_main
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:   # config/weights/adapter errors name their file
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
