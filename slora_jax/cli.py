"""`slora-jax` command line: `generate` (offline batch generation) and `serve`.

    slora-jax generate --model DIR [--adapter NAME=DIR ...] --requests IN.jsonl --out OUT.jsonl
    slora-jax serve ...            (see `slora-jax serve --help`)

Both drive the serving engine (serving/generate.py, serving/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("slora_jax")


def _dtype(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def load_model(model: str | None, dummy: str | None, dtype_name: str):
    """(ModelConfig, Params, tokenizer or None) from a folder or a dummy preset."""
    from slora_jax.config import load_model_config, preset
    from slora_jax.params import init_dummy_params, load_hf_params
    dtype = _dtype(dtype_name)
    if dummy:
        mc = preset(dummy)
        return mc, init_dummy_params(mc, dtype), None
    if model.endswith(".gguf"):        # any Llama-family GGUF: converted once, then cached
        from slora_jax.gguf_loader import hf_dir_for_gguf
        model = str(hf_dir_for_gguf(model, dtype="float32" if dtype_name == "float32" else "bfloat16"))
    mc = load_model_config(model)
    params = load_hf_params(model, mc, dtype)
    tok = None
    tok_path = os.path.join(model, "tokenizer.json")
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_path)
    return mc, params, tok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora-jax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    from serving.generate import add_parser
    add_parser(sub)
    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP server", add_help=False)
    s.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if argv and argv[0] == "serve":
        from serving.cli import main as serve_main
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:   # config/weights/adapter errors name their file
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
