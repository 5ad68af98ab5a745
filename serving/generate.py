"""`slora-jax generate`: offline batch generation through the serving engine.

    slora-jax generate --model DIR [--adapter NAME=DIR ...] --requests IN.jsonl --out OUT.jsonl

The same `Engine` as the server (continuous batching, adapter paging, the same
validation and errors), fed from a JSONL file instead of HTTP. Input lines:
{"id", "adapter" (name or null), "prompt_token_ids" or "prompt", "max_tokens",
"temperature", "top_p", "top_k", "seed", "ignore_eos", "n"}. Output lines, in input
order: {"id", "token_ids", "logprobs", "text" (when the model folder has a
tokenizer), "finish_reason"}, or {"id", "error"} for a request that could not
run; one bad line never stops the others. A line with "n" > 1 gives n lines, each
with its "index" (0..n-1), seeded as the server seeds a request's n samples, so
both give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import logging

from serving.requests import GenerationRequest, Overloaded, RequestError, sample_seed
from slora_jax.batching import Sampling

log = logging.getLogger("serving.generate")


MAX_SAMPLES = 64              # "n", as the server bounds it


def parse_requests(path: str, tok, eos_token_ids):
    """(requests, error lines, samples) of a JSONL file. A request's id is its "id" or
    line-N; sample j of a line with "n" > 1 has id "<id>#j", and `samples` maps it to
    (<id>, j)."""
    reqs, errors, samples = [], [], {}
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
                    ids = d["prompt_token_ids"]
                    if not isinstance(ids, list):
                        raise ValueError("'prompt_token_ids' must be a list of token ids")
                elif "prompt" in d:
                    if tok is None:
                        raise ValueError("field 'prompt' needs a model folder with tokenizer.json; "
                                         "give 'prompt_token_ids' instead")
                    ids = tok.encode(str(d["prompt"])).ids
                else:
                    raise ValueError("needs 'prompt_token_ids' or 'prompt'")
                adapter = d.get("adapter")
                if adapter is not None and not isinstance(adapter, str):
                    raise ValueError("'adapter' must be a name or null")
                n, seed = d.get("n", 1), d.get("seed", 0)
                if type(n) is not int or not 1 <= n <= MAX_SAMPLES:
                    raise ValueError(f"'n' must be an integer from 1 to {MAX_SAMPLES}")
                if type(seed) is not int:
                    raise ValueError("'seed' must be an integer")
                reqs += [GenerationRequest(
                    prompt=ids, adapter=adapter, max_tokens=d.get("max_tokens", 16),
                    sampling=Sampling(temperature=d.get("temperature", 0.0),
                                      top_p=d.get("top_p", 1.0), top_k=d.get("top_k", 0),
                                      seed=sample_seed(seed, j)),
                    stop_token_ids=frozenset() if d.get("ignore_eos") else frozenset(eos_token_ids),
                    id=rid if n == 1 else f"{rid}#{j}") for j in range(n)]
                if n > 1:
                    samples.update({f"{rid}#{j}": (rid, j) for j in range(n)})
            except (ValueError, TypeError) as e:
                errors.append({"id": rid, "error": f"{path}:{n}: {e}"})
    return reqs, errors, samples


def run(engine, reqs: list[GenerationRequest], progress: bool = False) -> dict[str, dict]:
    """Every request through a started `engine`; results by request id (as output lines).

    Requests are submitted as the engine's queue allows, so any number can be given."""
    results: dict[str, dict] = {}
    streams = []           # (id, SyncStream), oldest first
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(reqs), desc="generate", unit="req")

    def done(rid: str, d: dict) -> None:
        results[rid] = d
        if bar is not None:
            bar.update(1)

    def collect_oldest() -> None:
        rid, s = streams.pop(0)
        try:
            toks, lps, finish = s.result(timeout=3600)
            done(rid, {"id": rid, "token_ids": toks, "logprobs": lps, "finish_reason": finish})
        except RequestError as e:
            done(rid, {"id": rid, "error": e.message})

    for r in reqs:
        while True:
            try:
                streams.append((r.id, engine.generate_sync(r)))
                break
            except Overloaded:              # the queue is full: wait for the oldest
                collect_oldest()
            except RequestError as e:       # refused by the engine's validation
                done(r.id, {"id": r.id, "error": e.message})
                break
    while streams:
        collect_oldest()
    if bar is not None:
        bar.close()
    return results


_FLAGS = dict(max_batch=32, max_context=2048, max_prefill_tokens=1024, max_rank=64,
              page_size=16, num_pages=0)


def engine_settings(args) -> tuple[dict, dict]:
    """(EngineConfig fields, SchedulerConfig fields): defaults < --config's engine and
    scheduler sections (the `serve` YAML schema) < flags given."""
    from serving.bootstrap import load_yaml, section_fields
    from serving.scheduler import SchedulerConfig
    from slora_jax.config import EngineConfig
    y = load_yaml(args.config)
    path = args.config or "<flags>"
    eng = {k: v for k, v in _FLAGS.items() if v}
    eng.update(section_fields(EngineConfig, y.get("engine") or {}, path, "engine"))
    sch = section_fields(SchedulerConfig, y.get("scheduler") or {}, path, "scheduler")
    for k in _FLAGS:
        if getattr(args, k) is not None:
            eng[k] = getattr(args, k)
    return eng, sch


def cmd_generate(args) -> int:
    import jax.numpy as jnp

    from serving.adapter_store import StoreConfig
    from serving.engine import Engine
    from serving.scheduler import SchedulerConfig
    from slora_jax.params import load_model
    from slora_jax.config import EngineConfig
    from slora_jax.pool import PoolLayout

    if args.model and args.model.endswith(".gguf"):     # converted once, then cached
        from serving.gguf_convert import hf_dir_for_gguf
        args.model = str(hf_dir_for_gguf(
            args.model, dtype="float32" if args.dtype == "float32" else "bfloat16"))
    eng, sch = engine_settings(args)            # a bad file fails before the weights load
    mc, params, tok = load_model(args.model, args.dummy, args.dtype)
    eng["max_context"] = min(eng["max_context"], mc.max_position_embeddings)
    lay = PoolLayout.create(mc, EngineConfig(**{**eng, "num_pages": 2}))
    n_ad = max(1, min(len(args.adapter), eng["max_batch"]))
    eng.setdefault("max_prefill_requests", min(8, eng["max_batch"]))
    eng.setdefault("max_adapters_per_batch", n_ad)
    if not eng.get("num_pages"):
        eng["num_pages"] = (1 + eng["max_batch"] * lay.kv_pages_for(eng["max_context"])
                            + eng["max_adapters_per_batch"] * lay.max_adapter_pages)
    ec = EngineConfig(**eng)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    engine = Engine(params, mc, ec, dtype=dtype,
                    config=SchedulerConfig(**{"max_queue": 4 * ec.max_batch, **sch}),
                    store_config=StoreConfig(allowed_roots=()))
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--adapter expects NAME=DIR, got '{spec}'")
        engine.store.load_sync(engine.store.register_folder(name, path))
        if engine.store.lookup(name).error:
            raise ValueError(engine.store.lookup(name).error)
    reqs, errors, samples = parse_requests(args.requests, tok, mc.eos_token_ids)
    engine.start()
    try:
        results = run(engine, reqs, progress=not args.quiet)
    finally:
        engine.shutdown()
    n_err = len(errors)
    with open(args.out, "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
        for r in reqs:
            d = results[r.id]
            if r.id in samples:                         # sample j of a line with "n" > 1
                rid, j = samples[r.id]
                d = {"id": rid, "index": j, **{k: v for k, v in d.items() if k != "id"}}
            n_err += "error" in d
            if tok is not None and "token_ids" in d:
                d["text"] = tok.decode(d["token_ids"], skip_special_tokens=True)
            f.write(json.dumps(d) + "\n")
    log.info("wrote %d results (%d errors) to %s", len(reqs) + len(errors), n_err, args.out)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="offline batch generation from a JSONL file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model folder (config.json + safetensors)")
    src.add_argument("--dummy", help="random weights of a preset in configs/models/")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter folder, repeatable")
    g.add_argument("--requests", required=True, help="input JSONL")
    g.add_argument("--out", required=True, help="output JSONL")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    g.add_argument("--config", help="a `serve` YAML file: its engine and scheduler sections "
                                    "(buckets, budgets, ...) configure the engine; flags win")
    g.add_argument("--max-batch", type=int, help=f"default {_FLAGS['max_batch']}")
    g.add_argument("--max-context", type=int, help=f"default {_FLAGS['max_context']}")
    g.add_argument("--max-prefill-tokens", type=int,
                   help=f"default {_FLAGS['max_prefill_tokens']}")
    g.add_argument("--max-rank", type=int, help=f"default {_FLAGS['max_rank']}")
    g.add_argument("--page-size", type=int, help=f"default {_FLAGS['page_size']}")
    g.add_argument("--num-pages", type=int, help="default: sized for max-batch")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)
    return g
