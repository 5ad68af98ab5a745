"""Compiled steps kept on disk (`serving.executables`): a restart loads every bucket's step
instead of compiling it, and serves the same tokens; a change to the code a step runs, or
an unreadable file, compiles afresh."""

from __future__ import annotations

import logging
import os
import shutil

import jax.numpy as jnp
import pytest

from serving import executables
from serving.adapter_store import StoreConfig
from serving.engine import Engine, GenerationRequest, Sampling
from serving.scheduler import SchedulerConfig
from test_serving_setup import MC, engine_config, params, write_adapters

# Buckets of their own: no other test module's engine shares these executables.
EC = dict(max_batch=4, decode_buckets=(4,), max_prefill_tokens=16, prefill_token_buckets=(16,),
          max_prefill_requests=2, max_adapters_per_batch=4)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    write_adapters(root)
    return root


def start(root: str, directory: str) -> Engine:
    eng = Engine(params(), MC, engine_config(**EC), dtype=jnp.float32,
                 config=SchedulerConfig(base_only_steps=False),
                 store_config=StoreConfig(allowed_roots=(root,)), executable_dir=directory)
    eng.store.register_dir(root)
    eng.warmup(progress=False)
    return eng.start()


def tokens(eng: Engine) -> list[list[int]]:
    reqs = [GenerationRequest(prompt=[3 + i, 7, 11 * i % 50, 2], adapter=a, max_tokens=6,
                              sampling=Sampling(temperature=0.7, seed=i) if i % 2 else Sampling())
            for i, a in enumerate([None, "a00", "a04", "a11", None])]
    return [s.result()[0] for s in [eng.generate_sync(r) for r in reqs]]


def steps(engine: Engine) -> int:
    return len(engine.executables.table)


@pytest.fixture(scope="module")
def first_run(adapters, tmp_path_factory):
    """A server's first run: every step compiled and written. (directory, steps, tokens)"""
    d = str(tmp_path_factory.mktemp("cache") / "steps")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executables, "_MEMORY", {})      # this process forgets its executables
        eng = start(adapters, d)
        try:
            assert eng.executables.loaded == 0
            return d, steps(eng), tokens(eng)
        finally:
            eng.shutdown()


# The monkeypatched executables._MEMORY: a restart forgets what this process holds.
def test_a_restart_loads_every_step_and_serves_the_same_tokens(first_run, adapters,
                                                               monkeypatch):
    d, n, want = first_run
    assert n >= 2 and len([f for f in os.listdir(d) if f.endswith(".exe")]) == n
    monkeypatch.setattr(executables, "_MEMORY", {})
    compiled = dict(executables.COMPILED)
    eng = start(adapters, d)
    try:
        assert eng.executables.loaded == n
        assert dict(executables.COMPILED) == compiled        # nothing compiled
        assert tokens(eng) == want
        assert eng.compiled_since_warmup() == {k: 0 for k in eng.compiled_since_warmup()}
    finally:
        eng.shutdown()


def test_changed_code_or_a_bad_file_compiles_afresh(first_run, adapters, tmp_path,
                                                    monkeypatch, caplog):
    d = str(tmp_path / "steps")
    shutil.copytree(first_run[0], d)
    names = sorted(f for f in os.listdir(d) if f.endswith(".exe"))
    monkeypatch.setattr(executables, "_MEMORY", {})
    monkeypatch.setattr(executables, "source_digest", lambda: "other code")
    compiled = sum(executables.COMPILED.values())
    start(adapters, d).shutdown()
    assert sum(executables.COMPILED.values()) == compiled + len(names)
    monkeypatch.undo()

    with open(os.path.join(d, names[0]), "r+b") as f:
        f.truncate(100)
    monkeypatch.setattr(executables, "_MEMORY", {})
    with caplog.at_level(logging.WARNING, logger="serving.executables"):
        eng = start(adapters, d)
    try:
        assert eng.executables.loaded == len(names) - 1
        assert f"ignoring cached step {names[0][:-4]}" in caplog.text
        assert tokens(eng) == first_run[2]
    finally:
        eng.shutdown()


def test_an_unwritable_cache_directory_does_not_stop_the_engine(adapters, tmp_path,
                                                               monkeypatch, caplog):
    (tmp_path / "steps").write_text("a file where the directory should be")
    monkeypatch.setattr(executables, "_MEMORY", {})
    # (serializing stubbed: XLA:CPU cannot serialize this process's steps once they have run)
    monkeypatch.setattr(executables.serialize_executable, "serialize", lambda c: b"")
    with caplog.at_level(logging.WARNING, logger="serving.executables"):
        eng = start(adapters, str(tmp_path / "steps"))
    try:
        assert "not cached: [Errno 17] File exists" in caplog.text, caplog.text
        assert eng.executables.loaded == 0
        assert len(tokens(eng)) == 5
    finally:
        eng.shutdown()


def test_the_step_directory_is_held_to_its_bound_least_recently_used_first(tmp_path):
    """Past `max_bytes` the entries used longest ago go (a load refreshes an entry's time),
    never the one just written; other files are left alone."""
    sizes = {"a": 400, "b": 300, "c": 200, "d": 100}
    for i, (name, size) in enumerate(sizes.items()):
        path = tmp_path / f"{name}.exe"
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + i, 1000 + i))           # a oldest ... d newest
    os.utime(tmp_path / "a.exe", (2000, 2000))         # then a was loaded again
    (tmp_path / "notes.txt").write_bytes(b"y" * 5000)
    freed = executables.trim(str(tmp_path), 700, keep=str(tmp_path / "b.exe"))
    # b (oldest now) is kept as the new entry; c goes, then d; a (recently used) stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.exe", "b.exe", "notes.txt"]
    assert freed == 300
    assert executables.trim(str(tmp_path), 10_000) == 0
