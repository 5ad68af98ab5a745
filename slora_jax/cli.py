"""`slora-jax` command line: `generate` (offline batch generation) and `serve`.

    slora-jax generate --model DIR [--adapter NAME=DIR ...] --requests IN.jsonl --out OUT.jsonl
    slora-jax serve ...            (see `slora-jax serve --help`)

Input lines: {"id", "adapter" (name or null), "prompt_token_ids" or "prompt",
"max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"}. Output
lines: {"id", "token_ids", "logprobs", "text" (when the model folder has a
tokenizer), "finish_reason"} or {"id", "error"} for a request that could not
run; one bad line never stops the others.
"""

from __future__ import annotations

import argparse
import json
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


def _parse_requests(path: str, tok, mc):
    from serving.offline import Request
    from slora_jax.batching import Sampling
    reqs, errors = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rid = f"line-{n}"
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("a request line must be a JSON object")
                rid = str(d.get("id", rid))
                if "prompt_token_ids" in d:
                    ids = [int(t) for t in d["prompt_token_ids"]]
                elif "prompt" in d:
                    if tok is None:
                        raise ValueError("field 'prompt' needs a model folder with tokenizer.json; "
                                         "give 'prompt_token_ids' instead")
                    ids = tok.encode(str(d["prompt"])).ids
                else:
                    raise ValueError("needs 'prompt_token_ids' or 'prompt'")
                stop = () if d.get("ignore_eos") else tuple(mc.eos_token_ids)
                reqs.append(Request(
                    id=rid, prompt_token_ids=ids, adapter=d.get("adapter"),
                    max_tokens=int(d.get("max_tokens", 16)),
                    sampling=Sampling(temperature=float(d.get("temperature", 0.0)),
                                      top_p=float(d.get("top_p", 1.0)),
                                      top_k=int(d.get("top_k", 0)), seed=int(d.get("seed", 0))),
                    stop_token_ids=stop))
            except (ValueError, TypeError) as e:
                errors.append({"id": rid, "error": f"{path}:{n}: {e}"})
    return reqs, errors


def cmd_generate(args) -> int:
    from serving.offline import OfflineEngine
    from slora_jax.adapters import load_peft_adapter
    from slora_jax.config import EngineConfig
    from slora_jax.pool import PoolLayout

    mc, params, tok = load_model(args.model, args.dummy, args.dtype)
    adapters = []
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--adapter expects NAME=DIR, got '{spec}'")
        adapters.append(load_peft_adapter(path, mc, name=name, max_rank=args.max_rank))
    reqs, errors = _parse_requests(args.requests, tok, mc)
    max_ctx = min(args.max_context, mc.max_position_embeddings)
    probe = EngineConfig(page_size=args.page_size, num_pages=2, max_rank=args.max_rank,
                         max_context=max_ctx)
    lay = PoolLayout.create(mc, probe)
    num_pages = args.num_pages or (1 + args.max_batch * lay.kv_pages_for(max_ctx)
                                   + min(len(adapters), args.max_batch) * lay.max_adapter_pages)
    ec = EngineConfig(page_size=args.page_size, num_pages=num_pages, max_rank=args.max_rank,
                      max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                      max_prefill_requests=min(8, args.max_batch), max_context=max_ctx,
                      max_adapters_per_batch=max(1, min(args.max_batch, len(adapters) or 1)))
    eng = OfflineEngine(params, mc, ec, _dtype(args.dtype))
    for ad in adapters:
        eng.add_adapter(ad)
    results = eng.generate(reqs, progress=not args.quiet)
    with open(args.out, "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
        for r in results:
            if r.error:
                f.write(json.dumps({"id": r.id, "error": r.error}) + "\n")
                continue
            d = {"id": r.id, "token_ids": r.token_ids, "logprobs": r.logprobs,
                 "finish_reason": r.finish_reason}
            if tok is not None:
                d["text"] = tok.decode(r.token_ids, skip_special_tokens=True)
            f.write(json.dumps(d) + "\n")
    n_err = len(errors) + sum(1 for r in results if r.error)
    log.info("wrote %d results (%d errors) to %s", len(results) + len(errors), n_err, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slora-jax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="offline batch generation from a JSONL file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model folder (config.json + safetensors)")
    src.add_argument("--dummy", help="random weights of a preset in configs/models/")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter folder, repeatable")
    g.add_argument("--requests", required=True, help="input JSONL")
    g.add_argument("--out", required=True, help="output JSONL")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    g.add_argument("--max-batch", type=int, default=32)
    g.add_argument("--max-context", type=int, default=2048)
    g.add_argument("--max-prefill-tokens", type=int, default=1024)
    g.add_argument("--max-rank", type=int, default=64)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--num-pages", type=int, default=0, help="0 = size for max-batch")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)
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
