"""Warm-up: every shape the serving loop can dispatch, compiled before serving (prefill
steps: token buckets x {0, S} adapter slots, with max_batch decode rows, and, where a
prompt can outgrow a step, the top bucket continuing a prompt x {0, S}; decode batch buckets x {0, S}; adapter copies of
1, 2, 4, .. pages) and run once."""

from __future__ import annotations

import concurrent.futures
import os
import time

import jax
import numpy as np

from serving.device_steps import decode_step, prefill_step
from serving.step_batches import with_all_slots
from slora_jax.batching import Sampling, SlotInfo, decode_batch, mixed_batch
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
    calls = []                 # (jitted fn, its arguments after the engine state, kwargs)
    top = ec.token_buckets()[-1]
    continued = [(top, [1])] if ec.max_context - 1 > ec.max_prefill_tokens else []
    for n, starts in [(n, None) for n in ec.token_buckets()] + continued:
        n = min(n, ec.max_prefill_tokens)         # (a step continuing a prompt: the top bucket)
        for use in slot_kinds:
            b = mixed_batch((None, [], [], [], []), ([[0] * n], [np.zeros(0, np.int32)],
                                                     [0 if use else -1], [Sampling()], starts),
                            [null_slot] if use else [], ec, lay, device_put=False,
                            batch_size=ec.max_batch, num_requests=ec.max_prefill_requests,
                            num_tokens=top if starts else None)
            rows = np.full(ec.max_batch + ec.max_prefill_requests, engine.scheduler.dump_row,
                           np.int32)
            calls.append((prefill_step, *engine._step_args(b, rows)))
    for n in ec.batch_buckets():
        for use in slot_kinds:
            b = decode_batch(None, [0] * n, [np.zeros(0, np.int32)] * n, [0 if use else -1] * n,
                             [Sampling()] * n, [null_slot], ec, lay, device_put=False)
            if not engine.cfg.base_only_steps:
                b = b.replace(lora=with_all_slots(b.lora, [null_slot], ec, lay))
            rows = np.full(n, engine.scheduler.dump_row, np.int32)
            calls.append((decode_step, *engine._step_args(b, rows)))
    for n in engine.store.chunk_shapes():
        calls.append((load_adapter_pages, (np.zeros(n, np.int32), np.zeros(
            (lay.num_layers, n, lay.page_size, lay.row_width), engine._host_dtype())), {}))

    # Compile on threads: XLA compiles (and reads the compilation cache) outside the GIL.
    # A step's executable goes to engine.executables (loaded from disk when it has one);
    # jit's caches hand the adapter copies' executables to their first real call.
    def prepare(fn, args, kw):
        if fn is load_adapter_pages:
            fn.lower(*engine._state_args(fn), *args, **kw).compile()
        else:
            engine.executables.prepare(fn, (*engine._state_args(fn), *args), kw)

    t0 = time.perf_counter()
    threads = threads or min(len(calls), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads, "compile") as ex:
        futs = [ex.submit(prepare, *c) for c in calls]
        done = concurrent.futures.as_completed(futs)
        if progress:
            from tqdm import tqdm
            done = tqdm(done, total=len(futs), desc="compiling buckets", unit="shape")
        for f in done:
            f.result()
    t1 = time.perf_counter()
    for fn, args, kw in calls:            # run each once, in order (the pool is donated)
        if fn is load_adapter_pages:
            engine.pool = out = fn(engine.pool, *args)
        else:
            exe = engine.executables.get(fn, kw["packing"])
            engine.pool, engine.tok_buf, out, _ = exe(*engine._state_args(fn), *args)
        jax.block_until_ready(out)
    t2 = time.perf_counter()
    engine.warmup_seconds = {"compile": t1 - t0, "first runs": t2 - t1}
    return t2 - t0
