"""The engine's compiled steps, one per bucket, kept on disk between runs.

JAX's compilation cache skips XLA's compile on a restart, but a step must still be traced
and lowered to find its cache key, and for the Pallas steps lowering the Mosaic GPU kernels
is much of a bucket's start-up time. Here a restart loads each bucket's serialized
executable instead, keyed by everything that shapes it: the step's name, its static
arguments, its input shapes, the JAX and device versions, the JAX options that change a
lowering, and the source of the code it runs. A missing or unreadable entry is compiled
(and written) as if there were no cache.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import pickle
import tempfile
import threading
from typing import Any, Callable

import jax
import jaxlib
from jax.experimental import serialize_executable

log = logging.getLogger("serving.executables")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code a step runs (a change there must not load an old executable).
_SOURCES = ("slora_jax", "pallas_kernels", "serving/device_steps.py", "serving/packing.py")
_JAX_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        path = os.path.join(_ROOT, src)
        files = [path] if path.endswith(".py") else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py"))
        for f in files:
            h.update(os.path.relpath(f, _ROOT).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _environment() -> tuple:
    dev = jax.devices()[0]
    return (jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind,
            dev.client.platform_version, os.environ.get("XLA_FLAGS", ""),
            tuple(str(getattr(jax.config, o, None)) for o in _JAX_OPTIONS))


def cache_key(fn: Callable, args: tuple, static: dict) -> str:
    """The entry name of `fn(*args, **static)`: a readable prefix and a digest."""
    avals = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), args)
    text = repr((fn.__name__, sorted((k, repr(v)) for k, v in static.items()),
                 jax.tree.structure(args), jax.tree.leaves(avals), _environment(),
                 source_digest()))
    return f"{fn.__name__}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


# Every executable this process has made or loaded, by key: engines of one configuration
# share them (as they would share jit's caches), and COMPILED counts fresh compiles by step.
_MEMORY: dict[str, jax.stages.Compiled] = {}
COMPILED: collections.Counter = collections.Counter()
_lock = threading.Lock()


# The steps kept on disk: beyond this, the least recently used go (each configuration and
# each change of code makes new entries, a Llama-7B step tens of MB).
DEFAULT_MAX_BYTES = 8 << 30


def trim(directory: str, max_bytes: int, keep: str | None = None) -> int:
    """Delete the least recently used entries of `directory` (oldest modification time; a
    load refreshes it) until the rest fit in `max_bytes`, never `keep`. Returns bytes freed."""
    entries = []
    for name in os.listdir(directory):
        if name.endswith(".exe"):
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:                 # another process trimmed it meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, path))
    total, freed = sum(size for _, size, _ in entries), 0
    for _, size, path in sorted(entries):
        if total - freed <= max_bytes:
            break
        if path == keep:
            continue
        try:
            os.unlink(path)
            freed += size
        except OSError:
            pass
    return freed


class Executables:
    """An engine's compiled steps by (step function, packing); with a `directory`, each is
    also kept on disk for the next run, the directory held to `max_bytes`."""

    def __init__(self, directory: str | None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = directory
        self.max_bytes = max_bytes
        self.table: dict[tuple[Callable, Any], jax.stages.Compiled] = {}
        self.loaded = 0           # how many came from disk

    def get(self, fn: Callable, packing) -> jax.stages.Compiled | None:
        return self.table.get((fn, packing))

    def prepare(self, fn: Callable, args: tuple, static: dict) -> jax.stages.Compiled:
        """`fn(*args, **static)`'s executable: from this process, from disk, or compiled
        (and stored). Thread-safe for distinct steps: the warm-up calls it on threads."""
        key = cache_key(fn, args, static)
        compiled = _MEMORY.get(key)
        if compiled is None and self.directory:
            compiled = self._load(key, args)
            self.loaded += compiled is not None
        if compiled is None:
            compiled = fn.lower(*args, **static).compile()
            with _lock:
                COMPILED[fn.__name__] += 1
            if self.directory:
                self._store(key, compiled)
        _MEMORY[key] = self.table[fn, static["packing"]] = compiled
        return compiled

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key + ".exe")

    def _load(self, key: str, args: tuple) -> jax.stages.Compiled | None:
        try:
            with open(self._path(key), "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
        except FileNotFoundError:
            return None
        except Exception as e:                 # a truncated or foreign file: compile instead
            log.warning("ignoring cached step %s: %s", key, e)
            return None
        if in_tree != jax.tree.structure((args, {})):
            log.warning("ignoring cached step %s: its inputs differ", key)
            return None
        devices = next(x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)).devices()
        try:
            compiled = serialize_executable.deserialize_and_load(
                blob, in_tree, out_tree, execution_devices=sorted(devices, key=lambda d: d.id))
        except Exception as e:
            log.warning("ignoring cached step %s: %s", key, e)
            return None
        try:
            os.utime(self._path(key))            # recently used: trimmed last
        except OSError:
            pass
        return compiled

    def _store(self, key: str, compiled: jax.stages.Compiled) -> None:
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
            # a backend (or an op) that cannot serialize: JAX's cache still helps
            log.warning("step %s not cached: %s", key, e)
            return
        tmp = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(key))      # readers see a whole file or none
        except OSError as e:                      # a read-only or full disk: serve anyway
            log.warning("step %s not cached: %s", key, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            return
        with _lock:                               # warm-up threads store side by side
            freed = trim(self.directory, self.max_bytes, keep=self._path(key))
        if freed:
            log.info("compiled-step cache over %g GB: %.1f MB of the least recently used "
                     "steps removed", self.max_bytes / 1e9, freed / 1e6)
