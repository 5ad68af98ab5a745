"""The adapter store: S-LoRA's three adapter tiers (disk, host RAM, pool pages).

* **Disk (registered).** Registering an adapter records where it comes from
  (a PEFT folder, or a seeded dummy) and nothing else, so registering
  thousands is cheap: a directory scan, no file is parsed.
* **Host.** A background loader thread parses the folder and packs it into
  pool rows (`LoraAdapter.pack`, in the pool's dtype, cut into contiguous
  chunks of power-of-two page counts, so a copy has one of a few compiled
  shapes and nothing is padded). Host copies are kept in an LRU up to a byte budget;
  beyond it the least recently used copy is dropped (it is reloaded from its
  source when needed again), except copies that queued requests still wait
  for. Loading starts when a request for the adapter nears the head of the
  queue (prefetch), so disk I/O and packing overlap the device's work.
* **Pool.** `make_resident` gives an adapter pool pages from the shared
  `PageAllocator` and returns a `PendingLoad` that the engine writes with
  `load_adapter_pages` before the step that uses it, chunk by chunk.
  Running requests pin their adapter; unpinned resident adapters stay
  cached in an LRU and are evicted when KV or another adapter needs the
  pages.

Threads: registration and lookups from any thread (under `_lock`); the pool
tier only from the engine thread; loads on the loader threads.
Only folders under the configured roots are read (real paths, so a symlink
cannot escape), and only safetensors (`load_peft_adapter` refuses pickles).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Iterable

import numpy as np

from slora_jax.allocator import PageAllocator, adapter_used_elems
from serving.adapter_sources import (AdapterPathNotAllowed, DummySource,  # noqa: F401
                                     HostCopy, MemorySource, PeftSource, chunk_sizes,
                                     inside)
from slora_jax.adapters import (AdapterError, LoraAdapter, check_adapter, check_adapter_name,
                                check_served_modules, save_peft_adapter)  # noqa: F401
from slora_jax.batching import SlotInfo
from slora_jax.config import MODULES, HF_MODULE_NAMES, ModelConfig
from slora_jax.pool import PoolLayout

log = logging.getLogger("serving.adapters")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    host_cache_bytes: int = 8 << 30     # packed host copies kept in RAM
    loader_threads: int = 2
    load_chunk_pages: int = 8           # largest pages per device copy (a power of two)
    allowed_roots: tuple[str, ...] = ()


# --- entries ---------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class AdapterEntry:
    name: str
    source: object
    uid: int
    host: HostCopy | None = None
    loading: bool = False
    error: str | None = None
    slot: SlotInfo | None = None    # set while resident in the pool
    pins: int = 0                   # running requests using it (engine thread)
    wants: int = 0                  # queued requests waiting for it (engine thread)
    removed: bool = False

    @property
    def key(self) -> tuple:
        return ("adapter", self.name, self.uid)


@dataclasses.dataclass(eq=False)
class PendingLoad:
    """Pool pages to fill before the next step: chunks[i] goes to pages[i]."""
    entry: AdapterEntry
    pages: list[np.ndarray]      # [c] int32 each
    chunks: list[np.ndarray]     # [L, c, page_size, H] each
    host_seconds: float = 0.0    # time spent finding pages (evictions included)


class AdapterStore:
    def __init__(self, mc: ModelConfig, layout: PoolLayout, allocator: PageAllocator, *,
                 max_rank: int, dtype=np.float32, config: StoreConfig = StoreConfig(),
                 metrics=None, on_ready: Callable[[], None] | None = None):
        self.mc, self.layout, self.allocator = mc, layout, allocator
        self.max_rank, self.np_dtype, self.cfg = max_rank, dtype, config
        self.metrics = metrics
        self.on_ready = on_ready or (lambda: None)
        if config.load_chunk_pages < 1 or config.load_chunk_pages & (config.load_chunk_pages - 1):
            raise ValueError(f"load_chunk_pages={config.load_chunk_pages} must be a power of two")
        self.roots: list[str] = [os.path.realpath(r) for r in config.allowed_roots]
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._uid = 0
        self._host_lru: collections.OrderedDict[AdapterEntry, None] = collections.OrderedDict()
        self._host_bytes = 0
        self._removed: list[AdapterEntry] = []
        self._pool: collections.OrderedDict[AdapterEntry, None] = collections.OrderedDict()
        self._idle_pages = 0
        self._exec = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, config.loader_threads), thread_name_prefix="adapter-loader")

    # -- registration (any thread) ---------------------------------------------------
    def _add(self, name: str, source) -> AdapterEntry:
        check_adapter_name(name)
        with self._lock:
            if name in self._entries:
                raise AdapterError(f"adapter '{name}' is already registered")
            self._uid += 1
            e = self._entries[name] = AdapterEntry(name, source, self._uid)
        return e

    def add_root(self, root: str) -> None:
        real = os.path.realpath(root)
        with self._lock:
            if real not in self.roots:
                self.roots.append(real)

    def register_dir(self, root: str) -> list[str]:
        """Register every PEFT folder (one with adapter_config.json) inside `root`, lazily."""
        if not os.path.isdir(root):
            raise AdapterError(f"{root}: adapter directory does not exist")
        self.add_root(root)
        names = []
        for d in sorted(os.scandir(root), key=lambda d: d.name):
            cfg = os.path.join(d.path, "adapter_config.json")
            if not d.is_dir() or not os.path.isfile(cfg):
                continue
            if not inside(d.path, self.roots):
                log.warning("%r: skipped, resolves outside the adapter roots", d.path)
                continue
            self._add(d.name, PeftSource(d.path, tuple(self.roots)))
            names.append(d.name)
        return names

    def register_folder(self, name: str, path: str) -> AdapterEntry:
        """Register one PEFT folder named by the operator (lazily; the folder is its root)."""
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise AdapterError(f"{path}: no adapter_config.json")
        real = os.path.realpath(path)
        return self._add(name, PeftSource(real, (real,)))

    def register_path(self, name: str, path: str) -> AdapterEntry:
        """Register one PEFT folder under an allowed root and load it now (errors surface here).

        `path` comes from a client: errors echo it at most, never the real path it resolves to.
        """
        check_adapter_name(name)
        if name in self:
            raise AdapterError(f"adapter '{name}' is already registered")
        if not isinstance(path, str) or any(ord(c) < 32 or ord(c) == 127 for c in path):
            raise AdapterError("lora_path must not contain control characters")
        if not self.roots:
            raise AdapterPathNotAllowed("loading adapters by path is disabled: the server has "
                                        "no adapter root (start it with --adapters DIR or "
                                        "--allowed-lora-root DIR)")
        if not os.path.isabs(path):
            raise AdapterPathNotAllowed(f"lora_path '{path}' must be an absolute path")
        if not inside(path, self.roots):
            raise AdapterPathNotAllowed(f"lora_path '{path}' is not inside the allowed adapter "
                                        "roots")
        if not os.path.isdir(path):
            raise AdapterError(f"lora_path '{path}': no such adapter folder")
        src = PeftSource(os.path.realpath(path), tuple(self.roots))
        host = self._pack(src.load(self.mc, name, self.max_rank))
        e = self._add(name, src)
        self._install_host(e, host, 0.0)
        return e

    def register_dummy(self, name: str, rank: int, modules: Iterable[str] = ("q", "k", "v", "o"),
                       seed: int = 0, std: float = 0.05) -> AdapterEntry:
        modules = tuple(modules)
        bad = [m for m in modules if m not in MODULES]
        if bad:
            raise AdapterError(f"dummy adapter '{name}': unknown modules {bad} (have {MODULES})")
        if not 1 <= rank <= self.max_rank:
            raise AdapterError(f"dummy adapter '{name}': rank {rank} outside [1, {self.max_rank}]")
        check_served_modules(name, modules, self.layout)
        return self._add(name, DummySource(rank, modules, seed, std))

    def register_adapter(self, adapter: LoraAdapter) -> AdapterEntry:
        check_adapter_name(adapter.name)
        check_adapter(adapter, self.mc)
        check_served_modules(adapter.name, adapter.ranks, self.layout)
        for m, r in adapter.ranks.items():
            if r > self.max_rank:
                raise AdapterError(f"adapter '{adapter.name}': rank {r} of {HF_MODULE_NAMES[m]} "
                                   f"exceeds max_rank={self.max_rank}")
        return self._add(adapter.name, MemorySource(adapter))

    def unregister(self, name: str) -> None:
        """Forget `name` now; its pool pages are freed once no running request uses it."""
        with self._lock:
            e = self._entries.pop(name, None)
            if e is None:
                raise KeyError(name)
            e.removed = True
            if e.wants == 0:       # queued requests keep using what they were given
                self._drop_host(e)
            self._removed.append(e)
        self.on_ready()

    def lookup(self, name: str) -> AdapterEntry:
        with self._lock:
            return self._entries[name]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"registered": len(self._entries), "host": len(self._host_lru),
                    "pool": len(self._pool), "host_bytes": self._host_bytes}

    # -- host tier ---------------------------------------------------------------------
    def _pack(self, ad: LoraAdapter) -> HostCopy:
        rows, rank, scale, offset = ad.pack(self.layout, self.np_dtype)
        n = rows.shape[1]
        chunks, start = [], 0
        for c in chunk_sizes(n, self.cfg.load_chunk_pages):
            chunks.append(np.ascontiguousarray(rows[:, start:start + c]))
            start += c
        return HostCopy(chunks, n, rank, scale, offset, adapter_used_elems(ad.ranks, self.layout))

    def chunk_shapes(self) -> list[int]:
        """Every chunk size a copy can have (the engine compiles each at warm-up)."""
        out, c = [], self.cfg.load_chunk_pages
        while c:
            out.append(c)
            c //= 2
        return out

    def _install_host(self, e: AdapterEntry, host: HostCopy, seconds: float) -> None:
        with self._lock:
            e.loading, e.error = False, None
            if e.removed and e.wants == 0:      # unregistered while it loaded: keep nothing
                return
            e.host = host
            self._host_lru[e] = None
            self._host_bytes += host.nbytes
            self._trim_host(keep=e)
        if self.metrics is not None:
            self.metrics.adapter_loads.labels(tier="host").inc()
            self.metrics.adapter_load_seconds.labels(tier="host").observe(seconds)

    def _drop_host(self, e: AdapterEntry) -> None:     # under _lock
        if e.host is not None:
            self._host_bytes -= e.host.nbytes
            self._host_lru.pop(e, None)
            e.host = None
            if self.metrics is not None:
                self.metrics.adapter_evictions.labels(tier="host").inc()

    def _trim_host(self, keep: AdapterEntry) -> None:   # under _lock
        for e in list(self._host_lru):
            if self._host_bytes <= self.cfg.host_cache_bytes:
                break
            if e is keep or isinstance(e.source, MemorySource):
                continue
            if e.slot is not None or (e.wants == 0 and e.pins == 0):
                self._drop_host(e)

    def _load_job(self, e: AdapterEntry) -> None:
        t0 = time.perf_counter()
        try:
            host = self._pack(e.source.load(self.mc, e.name, self.max_rank))
        except Exception as ex:  # noqa: BLE001 - any failure is reported to the requests
            # Requests see the message; only the log names the folder on this server.
            folder = getattr(ex, "folder", None) or getattr(e.source, "path", None)
            where = f" from {folder!r}" if folder else ""
            if isinstance(ex, AdapterError):
                log.warning("adapter '%s' failed to load%s: %s", e.name, where, ex)
                why = str(ex)
            else:
                log.exception("adapter '%s' failed to load%s", e.name, where)
                why = f"internal error ({type(ex).__name__}), see the server log"
            with self._lock:
                e.loading, e.error = False, f"adapter '{e.name}' failed to load: {why}"
        else:
            self._install_host(e, host, time.perf_counter() - t0)
        self.on_ready()

    def request_host(self, e: AdapterEntry) -> None:
        """Start loading `e` into host RAM unless it is there, loading, or failed."""
        with self._lock:
            if e.host is not None:
                self._host_lru.move_to_end(e)
                return
            if e.loading or e.error is not None:
                return
            e.loading = True
        self._exec.submit(self._load_job, e)

    def clear_error(self, e: AdapterEntry) -> None:
        with self._lock:
            e.error = None

    def host_ready(self, e: AdapterEntry) -> bool:
        return e.host is not None

    def load_sync(self, e: AdapterEntry) -> None:
        """Load into host RAM in the calling thread (tests, warm starts)."""
        if e.host is None:
            self._load_job(e)

    def preload(self, names: list[str] | None = None, progress: bool = False,
                bar_position: int | None = None) -> int:
        """Load adapters into host RAM now (on the loader threads) until the budget is full.

        S-LoRA keeps every adapter in host memory; this reproduces that start
        for benchmarks. Returns how many host copies are held afterwards.
        """
        entries = [self.lookup(n) for n in (names if names is not None else self.names())]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(entries), desc="loading adapters to host", unit="adapter",
                       position=bar_position)
        inflight: collections.deque = collections.deque()

        def done_one():
            inflight.popleft().result()
            if bar is not None:
                bar.update()
        for e in entries:
            with self._lock:
                if self._host_bytes >= self.cfg.host_cache_bytes:
                    break
                if e.host is not None or e.loading:
                    continue
                e.loading = True
            inflight.append(self._exec.submit(self._load_job, e))
            if len(inflight) >= 4 * self.cfg.loader_threads:      # bound the work in flight
                done_one()
        while inflight:
            done_one()
        if bar is not None:
            bar.close()
        return self.stats()["host"]

    # -- wants and pins (engine thread) ---------------------------------------------------
    def want(self, e: AdapterEntry) -> None:
        """A queued request needs `e` (its host copy is kept; the scheduler starts the load
        when the request nears the head of the queue)."""
        e.wants += 1

    def unwant(self, e: AdapterEntry) -> None:
        e.wants -= 1
        if e.removed and e.wants == 0:
            # Unregistered while requests waited for it: the last of them is gone (admitted,
            # cancelled or aborted), so nothing of it may stay behind.
            with self._lock:
                self._drop_host(e)
            if e.pins == 0:
                self.evict(e)

    def pin(self, e: AdapterEntry) -> None:
        e.pins += 1
        if e.pins == 1 and e.slot is not None:
            self._idle_pages -= len(e.slot.pages)
            self._pool.move_to_end(e)

    def unpin(self, e: AdapterEntry) -> None:
        e.pins -= 1
        if e.pins == 0 and e.slot is not None:
            self._idle_pages += len(e.slot.pages)
            self._pool.move_to_end(e)
            if e.removed:
                self.evict(e)

    # -- pool tier (engine thread) ------------------------------------------------------
    def pages_needed(self, e: AdapterEntry) -> int:
        """Pool pages `e` would take (0 if resident). Needs the host copy if not resident."""
        if e.slot is not None:
            return 0
        return e.host.n_pages

    @property
    def idle_pages(self) -> int:
        """Pages of resident adapters that no running request uses (evictable)."""
        return self._idle_pages

    def evictable_pages(self, exclude: AdapterEntry | None = None) -> int:
        extra = len(exclude.slot.pages) if (exclude is not None and exclude.slot is not None
                                            and exclude.pins == 0) else 0
        return self._idle_pages - extra

    def evict(self, e: AdapterEntry) -> None:
        if e.slot is None:
            return
        assert e.pins == 0, f"evicting pinned adapter {e.name}"
        self.allocator.free(e.key)
        self._idle_pages -= len(e.slot.pages)
        self._pool.pop(e, None)
        e.slot = None
        if self.metrics is not None:
            self.metrics.adapter_evictions.labels(tier="pool").inc()

    def make_room(self, n_free: int, keep: AdapterEntry | None = None) -> bool:
        """Evict idle adapters, least recently used first, until `n_free` pages are free."""
        for e in list(self._pool):
            if self.allocator.num_free >= n_free:
                break
            if e.pins == 0 and e is not keep:
                self.evict(e)
        return self.allocator.num_free >= n_free

    def make_resident(self, e: AdapterEntry, evict: bool = True) -> PendingLoad | None:
        """Give `e` pool pages (evicting idle adapters if `evict`); None if already resident.

        The caller must have checked that the pages can be found, and that `e`
        has a host copy. The returned load must be written before any step
        that uses the slot.
        """
        if e.slot is not None:
            self._pool.move_to_end(e)
            return None
        host = e.host
        t0 = time.perf_counter()
        if evict:
            self.make_room(host.n_pages, keep=e)
        pages = self.allocator.alloc(e.key, host.n_pages, "adapter")
        self.allocator.set_used(e.key, host.used_elems)
        e.slot = SlotInfo(pages=pages, rank=host.rank, scale=host.scale, offset=host.offset)
        self._pool[e] = None
        if e.pins == 0:
            self._idle_pages += host.n_pages
        split, start = [], 0
        for chunk in host.chunks:
            split.append(pages[start:start + chunk.shape[1]])
            start += chunk.shape[1]
        with self._lock:
            if e.host is not None:
                self._host_lru.move_to_end(e)
        if self.metrics is not None:
            self.metrics.adapter_loads.labels(tier="pool").inc()
        return PendingLoad(e, split, host.chunks, time.perf_counter() - t0)

    def evict_idle(self) -> int:
        """Evict every resident adapter no running request uses; returns pages freed."""
        before = self.allocator.num_free
        for e in list(self._pool):
            if e.pins == 0:
                self.evict(e)
        return self.allocator.num_free - before

    def collect_removed(self) -> None:
        """Free the pool pages of unregistered adapters that nothing uses any more.

        One still pinned by a running request is evicted by `unpin` when its
        last request ends.
        """
        with self._lock:
            gone, self._removed = self._removed, []
        for e in gone:
            if e.pins == 0:
                self.evict(e)

    @property
    def has_removed(self) -> bool:
        return bool(self._removed)

    def resident_count(self) -> int:
        return len(self._pool)

    def shutdown(self) -> None:
        self._exec.shutdown(wait=False, cancel_futures=True)
