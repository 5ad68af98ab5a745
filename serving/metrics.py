"""Prometheus metrics of one serving engine, in its own registry.

The engine thread and the adapter loader threads record events (TTFT, time
per output token, adapter loads) here; gauges (queue length, running
requests, pool pages per tenant, adapters per tier) are read from the
engine's plain-int counters when `/metrics` is scraped, so a scrape never
touches the allocator or the scheduler's containers from another thread.
Each engine has its own `CollectorRegistry` (no process-global state), so
several engines can live in one process (tests, benchmarks).
"""

from __future__ import annotations

import collections
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "slora"):
        self.registry = registry or CollectorRegistry()
        self.prefix = prefix
        r, p = self.registry, prefix
        self.queue_length = Gauge(f"{p}_queue_length", "Requests waiting for admission", registry=r)
        self.running = Gauge(f"{p}_running_requests", "Requests admitted and generating",
                             registry=r)
        self.pool_pages = Gauge(f"{p}_pool_pages", "Pool pages by tenant", ["kind"], registry=r)
        self.adapters = Gauge(f"{p}_adapters", "Adapters per tier (registered = all; host = "
                              "packed in host RAM; pool = resident in pool pages)", ["tier"],
                              registry=r)
        self.adapter_loads = Counter(f"{p}_adapter_loads", "Adapter loads into a tier "
                                     "(host: parse+pack from disk; pool: copy into pages)",
                                     ["tier"], registry=r)
        self.adapter_load_seconds = Histogram(
            f"{p}_adapter_load_seconds", "Adapter load latency (host: disk read and pack "
            "on a loader thread; pool: page allocation, evictions and dispatch of the copies)",
            ["tier"], buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter(f"{p}_adapter_evictions", "Adapters dropped from a tier",
                                         ["tier"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds",
                              "Mean gap between output tokens of a request", buckets=_TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram(f"{p}_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter(f"{p}_requests_finished", "Requests finished, by reason",
                                ["reason"], registry=r)
        self.rejected = Counter(f"{p}_requests_rejected", "Requests refused or dropped, by cause",
                                ["cause"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter(f"{p}_steps", "Device steps dispatched", ["kind"], registry=r)
        self.step_seconds = Histogram(
            f"{p}_step_seconds", "Device time of a step (read back minus the later of its "
            "dispatch and the previous step's read-back), by kind (prefill: with chunks)",
            ["kind"], buckets=_TPOT_BUCKETS, registry=r)

    def bind_gauges(self, read: Callable[[], dict]) -> None:
        """Gauges computed at scrape time from `read()` (an engine's stats snapshot)."""
        self.queue_length.set_function(lambda: read()["waiting"])
        self.running.set_function(lambda: read()["running"])
        for kind in ("kv", "adapter", "free"):
            self.pool_pages.labels(kind=kind).set_function(lambda k=kind: read()["pages"][k])
        for tier in ("registered", "host", "pool"):
            self.adapters.labels(tier=tier).set_function(lambda t=tier: read()["adapters"][t])
        Gauge(f"{self.prefix}_preemptions", "Requests preempted since start (their KV pages "
              "reclaimed when the pool ran dry; recomputed later, nothing streamed twice)",
              registry=self.registry).set_function(lambda: read()["preemptions"])

    def bind_sections(self, totals: dict[str, float]) -> None:
        """`slora_engine_thread_seconds{section}`: the engine thread's time by section."""
        g = Gauge(f"{self.prefix}_engine_thread_seconds", "Engine thread time by loop section "
                  "(device_wait: blocked on the device's tokens; idle: nothing to do)",
                  ["section"], registry=self.registry)
        for sec in SectionClock.SECTIONS:
            g.labels(section=sec).set_function(lambda k=sec: totals.get(k, 0.0))

    def record_startup(self, phases: dict[str, float]) -> None:
        """`slora_startup_seconds{phase}`: how long each start-up phase took."""
        g = Gauge(f"{self.prefix}_startup_seconds", "Wall time of each start-up phase "
                  "(process: spawn and imports; params; engine: pool and store; adapters: "
                  "registering; warmup: every bucket compiled or loaded and run; preload: "
                  "what --preload took beyond the warm-up it overlaps)",
                  ["phase"], registry=self.registry)
        for k, v in phases.items():
            g.labels(phase=k).set(v)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SectionClock:
    """Attributes wall time to the section that just ended: `lap(name)` adds the time since
    the previous lap to `totals[name]`. One `perf_counter` call per section, cheap enough
    to stay on in the serving loop."""

    SECTIONS = ("intake", "schedule", "build", "device_put", "launch", "dispatch",
                "device_wait", "complete", "prefetch", "deliver", "idle")

    def __init__(self):
        self.totals: dict[str, float] = collections.defaultdict(float)
        self._t = time.perf_counter()

    def lap(self, section: str) -> None:
        t = time.perf_counter()
        self.totals[section] += t - self._t
        self._t = t


class StartupClock:
    """Wall time of consecutive start-up phases: `done(name)` closes the phase that began
    at the previous call (or at `t0`, a `time.time()`), logs it and keeps it."""

    def __init__(self, log, t0: float | None = None):
        self.log = log
        self.t0 = time.time() if t0 is None else t0
        self._t = self.t0
        self.phases: dict[str, float] = {}

    def done(self, name: str) -> float:
        t = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + (t - self._t)
        self._t = t
        self.log.info("start-up: %s took %.1fs (%.1fs since start)", name, self.phases[name],
                      t - self.t0)
        return self.phases[name]
