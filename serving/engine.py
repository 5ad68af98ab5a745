"""The serving engine: a thread that drives the step functions for a stream of requests.

Data flow: the server (asyncio) calls `Engine.generate(request)` and gets an
`AsyncStream`; the request goes through an inbox to the engine thread, whose
loop is

    drain inbox -> early abort -> schedule step n -> dispatch step n
                -> read back step n-1 -> deliver its tokens -> prefetch adapters

The host runs one step ahead: step n is dispatched before step n-1's tokens
are read, because a step's batch composition never depends on the previous
step's tokens. Each running request owns a row of a device-side token buffer
`tok_buf` [max_batch + 1]; every step scatters its sampled tokens into their
rows and a decode step gathers its input tokens from them, inside the same
jitted call, so a change in batch composition costs no host round trip. A
request that stops on a stop token is noticed one step late; its extra step
writes only into its own reserved pages and its output is dropped. Pages
freed by the host are safe to hand out at once: every later step and
adapter copy takes the pool produced by the earlier ones, so device writes
happen in dispatch order.

Every shape the loop dispatches is compiled by `warmup()` (serving/warmup.py) before
serving; `compiled_since_warmup()` checks that none was added since.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from serving.adapter_store import AdapterStore, PendingLoad, StoreConfig
from serving.device_steps import JITTED, Inflight, decode_step, prefill_step
from serving import executables
from serving.executables import Executables
from slora_jax.allocator import PageAllocator
from serving.metrics import SectionClock, ServingMetrics
from serving.packing import pack
from serving.streams import AsyncStream, Output, SyncStream
from serving.warmup import warm_up
from serving.requests import (AdapterLoadFailed, EngineInfo, GenerationRequest, InvalidRequest,
                              Overloaded, RequestError, SloAbort, Unavailable, UnknownAdapter)
from serving.scheduler import Scheduler, SchedulerConfig, Seq, Step, now
from serving.step_batches import decode_step_batch, prefill_step_batch
from slora_jax.batching import Sampling, SamplingError
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.model import StepSpec
from slora_jax.params import Params
from slora_jax.pool import PoolLayout, init_pool, load_adapter_pages

log = logging.getLogger("serving.engine")
MAX_SLO_S = 86400.0       # a first-token SLO longer than a day is a mistake, not a wish

__all__ = ["Engine", "Output", "AsyncStream", "SyncStream", "GenerationRequest", "Sampling",
           "SchedulerConfig", "StoreConfig", "RequestError", "InvalidRequest", "UnknownAdapter",
           "Overloaded", "Unavailable", "SloAbort", "AdapterLoadFailed"]


# --- the engine ------------------------------------------------------------------------

class Engine:
    def __init__(self, params: Params, mc: ModelConfig, ec: EngineConfig, *,
                 dtype=jnp.bfloat16, config: SchedulerConfig = SchedulerConfig(),
                 store_config: StoreConfig = StoreConfig(),
                 metrics: ServingMetrics | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 executable_dir: str | None = None,
                 executable_max_bytes: int = executables.DEFAULT_MAX_BYTES):
        if ec.batch_buckets()[-1] < ec.max_batch:
            raise ValueError(f"decode_buckets {ec.batch_buckets()} do not reach max_batch="
                             f"{ec.max_batch}")
        if ec.token_buckets()[-1] < ec.max_prefill_tokens:
            raise ValueError(f"prefill_token_buckets {ec.token_buckets()} do not reach "
                             f"max_prefill_tokens={ec.max_prefill_tokens}")
        self.params, self.mc, self.ec, self.cfg = params, mc, ec, config
        self.layout = PoolLayout.create(mc, ec)
        self.spec = StepSpec.for_engine(mc, self.layout, ec)
        self.dtype = jnp.dtype(dtype)
        self.metrics = metrics or ServingMetrics()
        self.pool = init_pool(self.layout, self.dtype)
        self.allocator = PageAllocator(ec.num_pages)
        self._wake = threading.Event()
        self.store = AdapterStore(mc, self.layout, self.allocator, max_rank=ec.max_rank,
                                  dtype=self._host_dtype(), config=store_config,
                                  metrics=self.metrics, on_ready=self._wake.set)
        self.scheduler = Scheduler(ec, self.layout, config, self.allocator, self.store,
                                   on_fail=self._on_fail)
        self.tok_buf = jax.jit(lambda: jnp.zeros(ec.max_batch + 1, jnp.int32))()
        self._inbox: collections.deque = collections.deque()
        self._submit_lock = threading.Lock()
        self._live: dict[str, Seq] = {}
        self._outbox: list[tuple[Any, Output]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.on_fatal = on_fatal     # called on the engine thread if the loop fails
        self.clock = SectionClock()  # where the engine thread's time goes (/metrics)
        self._last_ready = 0.0
        self._compiled: dict[str, int] | None = None
        # each bucket's compiled step (warmup() fills it; from disk when a directory is given)
        self.executables = Executables(executable_dir, executable_max_bytes)
        self._n_steps = 0
        self._warned_compile = False
        self.metrics.bind_gauges(self.stats)
        self.metrics.bind_sections(self.clock.totals)

    def _host_dtype(self):
        if self.dtype == jnp.bfloat16:
            import ml_dtypes
            return ml_dtypes.bfloat16
        return np.dtype(self.dtype)

    # -- lifecycle -----------------------------------------------------------------------
    def warmup(self, progress: bool = True, threads: int | None = None) -> float:
        """Compile (and run once) every shape the serving loop can dispatch, compiling on
        `threads` threads (default: one per shape, at most one per CPU). Returns seconds."""
        secs = warm_up(self, progress, threads)
        self._compiled = self._cache_sizes()
        return secs

    @staticmethod
    def _cache_sizes() -> dict[str, int]:
        """Executables this process has compiled, by device function (steps go through
        `serving.executables`, the adapter copies through jit's cache)."""
        return {f.__name__: (f._cache_size() if f is load_adapter_pages
                             else executables.COMPILED[f.__name__]) for f in JITTED}

    def compiled_since_warmup(self) -> dict[str, int]:
        """Compilations added to the step functions since warmup() (should be all zero)."""
        if self._compiled is None:
            return {}
        return {k: v - self._compiled[k] for k, v in self._cache_sizes().items()}

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="slora-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.store.shutdown()

    @property
    def alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self.error is None)

    # -- requests (any thread) -------------------------------------------------------------
    def validate(self, req: GenerationRequest):
        """Raise the RequestError that `req` deserves; return its adapter entry."""
        ec, mc = self.ec, self.mc
        p = req.prompt
        if not p:
            raise InvalidRequest("the prompt is empty", "prompt")
        bad = [t for t in p if not (isinstance(t, (int, np.integer)) and 0 <= t < mc.vocab_size)]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                 f"[0, {mc.vocab_size})", "prompt")
        if not isinstance(req.max_tokens, (int, np.integer)) or req.max_tokens < 1:
            raise InvalidRequest("max_tokens must be an integer >= 1", "max_tokens")
        if len(p) >= ec.max_context:
            raise InvalidRequest(f"the prompt has {len(p)} tokens; this server accepts at most "
                                 f"{ec.max_context - 1}", "prompt")
        if len(p) + req.max_tokens > ec.max_context:
            raise InvalidRequest(f"the prompt ({len(p)} tokens) plus max_tokens "
                                 f"({req.max_tokens}) exceeds the context length of "
                                 f"{ec.max_context} tokens", "max_tokens")
        if self.scheduler.kv_pages_for(req) > self.allocator.capacity:
            raise InvalidRequest("the request's KV cache cannot fit in the pool", "max_tokens")
        try:
            req.sampling.check()
        except SamplingError as e:
            raise InvalidRequest(str(e), e.field) from None
        slo = req.ttft_slo_s
        if slo is not None and not (isinstance(slo, (int, float)) and 0 <= slo <= MAX_SLO_S):
            raise InvalidRequest(f"'ttft_slo_s' must be in [0, {MAX_SLO_S:g}] seconds, got "
                                 f"{slo!r}", "ttft_slo_s")
        if req.adapter is None:
            return None
        try:
            return self.store.lookup(req.adapter)
        except KeyError:
            raise UnknownAdapter(f"The model `{req.adapter}` does not exist.", "model") from None

    def submit(self, req: GenerationRequest, stream) -> Seq:
        entry = self.validate(req)
        if not self.alive:
            raise Unavailable("the engine is not running")
        t = now()
        slo = req.ttft_slo_s if req.ttft_slo_s is not None else self.cfg.ttft_slo_s
        seq = Seq(req=req, stream=stream, entry=entry, arrival=t,
                  deadline=None if slo is None else t + slo)
        stream.request_id = req.id
        with self._submit_lock:
            if len(self._inbox) + len(self.scheduler.waiting) >= self.cfg.max_queue:
                self.metrics.rejected.labels(cause="queue_full").inc()
                raise Overloaded(f"the server is overloaded ({self.cfg.max_queue} requests "
                                 "queued); retry later")
            self._inbox.append(("submit", seq))
        self._wake.set()
        return seq

    def generate(self, req: GenerationRequest) -> AsyncStream:
        """Submit from a running event loop; raises RequestError synchronously if refused."""
        stream = AsyncStream(self, asyncio.get_running_loop())
        self.submit(req, stream)
        return stream

    def generate_sync(self, req: GenerationRequest) -> SyncStream:
        stream = SyncStream(self)
        self.submit(req, stream)
        return stream

    def evict_idle_adapters(self, timeout: float = 10.0) -> int:
        """Drop every idle adapter from the pool (on the engine thread); returns pages freed."""
        done: queue.Queue[int] = queue.Queue()
        self._inbox.append(("evict_idle", done))
        self._wake.set()
        return done.get(timeout=timeout)

    def cancel(self, request_id: str | None) -> None:
        if request_id is not None:
            self._inbox.append(("cancel", request_id))
            self._wake.set()

    # -- what the HTTP server calls (serving.client.EngineClient has the same surface) ------
    @property
    def info(self) -> EngineInfo:
        return EngineInfo(model_name=self.mc.name, vocab_size=self.mc.vocab_size,
                          max_context=self.ec.max_context,
                          max_prompt_tokens=self.ec.max_context - 1,
                          eos_token_ids=tuple(self.mc.eos_token_ids))

    async def adapter_names(self) -> list[str]:
        return self.store.names()

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self.store.register_path, name, path)

    async def unload_adapter(self, name: str) -> None:
        """Raises KeyError for an unknown name."""
        self.store.unregister(name)

    async def metrics_text(self) -> bytes:
        return self.metrics.render()

    def stats(self) -> dict:
        cap = self.allocator.capacity
        free = self.allocator.num_free
        kv = self.scheduler.kv_pages_used
        st = self.store.stats()
        return {"waiting": len(self._inbox) + len(self.scheduler.waiting),
                "running": len(self.scheduler.running),
                "pages": {"kv": kv, "adapter": cap - free - kv, "free": free, "capacity": cap},
                "adapters": {"registered": st["registered"], "host": st["host"],
                             "pool": st["pool"]},
                "host_bytes": st["host_bytes"], "preemptions": self.scheduler.preemptions}

    # -- the loop (engine thread) -------------------------------------------------------
    def _run(self) -> None:
        inflight: Inflight | None = None
        try:
            lap = self.clock.lap
            while not self._stopping:
                self._drain()
                self.scheduler.abort_late(now())
                if self.store.has_removed:
                    self.store.collect_removed()
                lap("intake")
                step = self.scheduler.schedule()
                lap("schedule")
                nxt = self._dispatch(step) if step is not None else None
                lap("dispatch")
                if inflight is not None:
                    self._complete(inflight)        # laps device_wait, then complete
                    lap("complete")
                inflight = nxt
                for load in self.scheduler.prefetch():
                    self._write(load)
                lap("prefetch")
                self._flush()
                lap("deliver")
                if inflight is None and not self._inbox:
                    if self._wake.wait(0.02 if self.scheduler.waiting else 0.5):
                        self._wake.clear()
                lap("idle")
        except BaseException as e:  # noqa: BLE001 - reported to every request, then on_fatal
            log.exception("engine loop failed")
            self.error = e
        finally:
            if inflight is not None and self.error is None:
                self._complete(inflight)
            why = Unavailable("the engine stopped" if self.error is None else
                              f"the engine failed ({type(self.error).__name__}); the server "
                              "is restarting")
            try:
                self._drain()
            finally:
                for seq in list(self._live.values()):
                    self.scheduler.fail(seq, why)
                self._flush()
                if self.error is not None and self.on_fatal is not None:
                    # A loop that failed cannot be trusted with the pool: the process exits
                    # so that a supervisor restarts it, instead of answering 503 forever.
                    self.on_fatal(self.error)

    def _drain(self) -> None:
        while self._inbox:
            # Peek, act, then pop: `stats` (other threads) counts the inbox as waiting, so a
            # request is never in neither the inbox nor the scheduler.
            kind, x = self._inbox[0]
            try:
                self._drain_one(kind, x)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own
                if kind != "submit":
                    raise
                log.exception("request %s could not be queued", x.req.id)
                if x.state == "waiting":
                    self.scheduler.cancel(x)
                x.state = "done"
                self._on_fail(x, InvalidRequest(f"the request could not be queued "
                                                f"({type(e).__name__})"))
            finally:
                self._inbox.popleft()

    def _drain_one(self, kind, x) -> None:
        if kind == "submit":
            self._live[x.req.id] = x
            self.scheduler.add(x)
        elif kind == "evict_idle":
            x.put(self.store.evict_idle())
        else:
            seq = self._live.pop(x, None)
            if seq is not None and seq.state != "done":
                self.scheduler.cancel(seq)
                self.metrics.finished.labels(reason="abort").inc()
                self._outbox.append((seq.stream, Output([], [], finish_reason="abort")))

    def _on_fail(self, seq: Seq, err: RequestError) -> None:
        self._live.pop(seq.req.id, None)
        self.metrics.rejected.labels(cause=err.code or err.type).inc()
        self._outbox.append((seq.stream, Output([], [], error=err)))

    def _flush(self) -> None:
        """Hand this iteration's outputs over, one delivery per channel (event loop, queue
        or process link)."""
        if not self._outbox:
            return
        by_channel: dict[Any, list] = {}
        for stream, out in self._outbox:
            by_channel.setdefault(stream.channel, []).append((stream, out))
        self._outbox = []
        for channel, items in by_channel.items():
            channel.deliver(items)

    # -- dispatch ---------------------------------------------------------------------------
    def _write(self, load: PendingLoad) -> None:
        t0 = time.perf_counter()
        for pages, chunk in zip(load.pages, load.chunks):
            self.pool = load_adapter_pages(self.pool, pages, chunk)
        self.metrics.adapter_load_seconds.labels(tier="pool").observe(
            load.host_seconds + time.perf_counter() - t0)

    def _call(self, fn, batch, rows):
        buf, packing = pack((batch, rows))
        self.clock.lap("build")
        buf = jax.device_put(buf)
        self.clock.lap("device_put")
        exe = self.executables.get(fn, packing)
        if exe is None:                   # a shape warmup() did not make (or no warm-up)
            exe = self.executables.prepare(fn, (self.params, self.pool, self.tok_buf, buf),
                                           dict(spec=self.spec, packing=packing))
        self.pool, self.tok_buf, tokens, logprobs = exe(self.params, self.pool, self.tok_buf,
                                                        buf)
        self.clock.lap("launch")
        return tokens, logprobs

    def _step_args(self, batch, rows):
        """A step's arguments after the engine state (warm-up), as `_call` passes them."""
        buf, packing = pack((batch, rows))
        return (jax.device_put(buf),), dict(spec=self.spec, packing=packing)

    def _state_args(self, fn) -> tuple:
        return (self.pool,) if fn is load_adapter_pages else (self.params, self.pool, self.tok_buf)

    def _dispatch(self, step: Step) -> Inflight:
        for load in step.loads:
            self._write(load)
        seqs = list(step.seqs)
        index = list(range(len(seqs)))
        ec, lay, dump, base_only = (self.ec, self.layout, self.scheduler.dump_row,
                                    self.cfg.base_only_steps)
        if step.kind == "prefill":
            b, rows = prefill_step_batch(seqs, step.chunks, ec, lay, dump, base_only)
            fn = prefill_step
            for j, c in enumerate(step.chunks):
                c.seq.n_prefilled = c.end
                if c.last:
                    seqs.append(c.seq)
                    index.append(ec.max_batch + j)
            self.metrics.prompt_tokens.inc(sum(c.end - c.start for c in step.chunks))
        else:
            b, rows = decode_step_batch(seqs, ec, lay, dump, base_only)
            fn = decode_step
        t = now()
        tokens, logprobs = self._call(fn, b, rows)
        for x in (tokens, logprobs):
            x.copy_to_host_async()
        for s in seqs:
            s.n_dispatched += 1
        self.metrics.steps.labels(kind=step.kind).inc()
        self._n_steps += 1
        if self._n_steps % 1024 == 0 and not self._warned_compile:
            grown = {k: v for k, v in self.compiled_since_warmup().items() if v}
            if grown:
                self._warned_compile = True
                log.warning("the serving loop compiled new shapes after warm-up: %s", grown)
        return Inflight(step.kind, seqs, [s.epoch for s in seqs], index, tokens, logprobs, t)

    def _complete(self, inf: Inflight) -> None:
        toks = np.asarray(inf.tokens)
        lps = np.asarray(inf.logprobs)
        self.clock.lap("device_wait")
        t = now()
        step_s = t - max(inf.t_dispatch, self._last_ready)
        self.scheduler.observe_step(inf.kind, step_s)
        self.metrics.step_seconds.labels(kind=inf.kind).observe(step_s)
        self._last_ready = t
        m = self.metrics
        n_new = 0
        for i, s in enumerate(inf.seqs):
            if s.state != "running" or s.epoch != inf.epochs[i]:
                continue            # cancelled, stopped a step ago (run-ahead), or preempted
            tok = int(toks[inf.index[i]])
            s.generated.append(tok)
            s.n_out += 1
            n_new += 1
            if s.n_out == 1:
                s.t_first = t
                m.ttft.observe(t - s.arrival)
            finish = None
            if tok in s.req.stop_token_ids:
                finish = "stop"
            elif s.n_out >= s.req.max_tokens:
                finish = "length"
            self._outbox.append((s.stream, Output([tok], [float(lps[inf.index[i]])], finish,
                                                  num_prompt_tokens=s.prompt_len)))
            if finish is not None:
                self.scheduler.finish(s)
                self._live.pop(s.req.id, None)
                m.finished.labels(reason=finish).inc()
                m.e2e.observe(t - s.arrival)
                if s.n_out > 1:
                    m.tpot.observe((t - s.t_first) / (s.n_out - 1))
        m.generation_tokens.inc(n_new)
