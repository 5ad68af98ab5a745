"""Warm-up: every shape the serving loop can dispatch, compiled before serving (prefill
token buckets x {0, S} adapter slots, decode batch buckets x {0, S}, adapter copies of
1, 2, 4, .. pages) and run once."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time

import jax
import numpy as np

from serving.device_steps import decode_step, prefill_step
from slora_jax.batching import Sampling, SlotInfo, decode_batch, prefill_batch
from slora_jax.config import MODULES
from slora_jax.pool import load_adapter_pages


def warm_up(engine, progress: bool = True, threads: int | None = None) -> float:
    """Compile every shape of `engine` on `threads` threads, then run each once in order.
    Sets `engine.warmup_seconds` (compile, first runs); returns the seconds it took."""
    ec, lay = engine.ec, engine.layout
    m = len(MODULES)
    null_slot = SlotInfo(pages=np.zeros(0, np.int32), rank=np.zeros(m, np.int32),
                         scale=np.zeros(m, np.float32), offset=np.zeros((m, 2), np.int32))
    slot_kinds = [False, True] if engine.cfg.base_only_steps else [True]
    jobs = []
    for t in ec.token_buckets():
        for use in slot_kinds:
            jobs.append(("prefill", t, use))
    for b in ec.batch_buckets():
        for use in slot_kinds:
            jobs.append(("decode", b, use))
    for c in engine.store.chunk_shapes():
        jobs.append(("adapter-copy", c, False))
    calls = []                 # (kind, jitted fn, its arguments after the state)
    for kind, n, use in jobs:
        slot = [0 if use else -1]
        if kind == "prefill":
            n = min(n, ec.max_prefill_tokens)
            b = prefill_batch([[0] * n], [np.zeros(0, np.int32)], slot, [Sampling()],
                              [null_slot], ec, lay, device_put=False)
            calls.append((kind, prefill_step,
                          engine._step_args(*engine._finish_prefill(b, [null_slot] if use else []))))
        elif kind == "decode":
            b = decode_batch(None, [0] * n, [np.zeros(0, np.int32)] * n, slot * n,
                             [Sampling()] * n, [null_slot], ec, lay, device_put=False)
            calls.append((kind, decode_step,
                          engine._step_args(*engine._finish_decode(b, [null_slot] if use else []))))
        else:
            calls.append((kind, load_adapter_pages, ((np.zeros(n, np.int32), np.zeros(
                (lay.num_layers, n, lay.page_size, lay.row_width), engine._host_dtype())), {})))
    t0 = time.perf_counter()
    engine.warmup_seconds: dict[str, float] = collections.defaultdict(float)

    # Compile on threads: XLA compiles (and reads the compilation cache) outside the
    # GIL, and jit's caches hand each compiled executable to the first real call.
    def compile_one(kind, fn, extra):
        t = time.perf_counter()
        fn.lower(*engine._state_args(fn), *extra[0], **extra[1]).compile()
        return kind, time.perf_counter() - t
    threads = threads or min(len(calls), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads, "compile") as ex:
        futs = [ex.submit(compile_one, *c) for c in calls]
        done = concurrent.futures.as_completed(futs)
        if progress:
            from tqdm import tqdm
            done = tqdm(done, total=len(futs), desc="compiling buckets", unit="shape")
        for f in done:
            f.result()
    engine.warmup_seconds["compile"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    for kind, fn, (extra, kw) in calls:         # run each once, in order (the pool is donated)
        if fn is load_adapter_pages:
            engine.pool = out = fn(engine.pool, *extra)
        else:
            engine.pool, engine.tok_buf, out, _ = fn(*engine._state_args(fn), *extra, **kw)
        jax.block_until_ready(out)
    engine.warmup_seconds["first runs"] = time.perf_counter() - t1
    return time.perf_counter() - t0
