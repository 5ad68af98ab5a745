"""The adapter store's tiers and the scheduler's policy, on the host alone (nothing compiles)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from serving.adapter_store import (AdapterPathNotAllowed, AdapterStore, StoreConfig,
                                   save_peft_adapter)
from slora_jax.allocator import PageAllocator
from serving.requests import GenerationRequest, SloAbort
from serving.scheduler import Scheduler, SchedulerConfig, Seq, now
from slora_jax.adapters import AdapterError, dummy_adapter
from slora_jax.pool import PoolLayout
from test_serving_setup import MC, engine_config


def make_store(num_pages=160, **cfg):
    ec = engine_config(num_pages=num_pages)
    lay = PoolLayout.create(MC, ec)
    alloc = PageAllocator(ec.num_pages)
    return AdapterStore(MC, lay, alloc, max_rank=ec.max_rank, config=StoreConfig(**cfg)), ec, lay


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- registration and the disk tier -------------------------------------------------------

def test_registering_2000_adapter_folders_is_lazy_and_cheap(tmp_path):
    for i in range(2000):
        d = tmp_path / f"user-{i:04d}"
        d.mkdir()
        (d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
        (d / "adapter_model.safetensors").write_bytes(b"")   # never read at registration
    store, *_ = make_store()
    t0 = time.perf_counter()
    names = store.register_dir(str(tmp_path))
    took = time.perf_counter() - t0
    assert len(names) == 2000 and names[0] == "user-0000"
    assert store.stats() == {"registered": 2000, "host": 0, "pool": 0, "host_bytes": 0}
    assert took < 5.0, f"registering 2000 folders took {took:.2f}s"


def test_a_broken_lazy_adapter_reports_its_file(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (d / "adapter_model.safetensors").write_bytes(b"not safetensors")
    store, *_ = make_store()
    store.register_dir(str(tmp_path))
    e = store.lookup("broken")
    store.load_sync(e)
    assert e.host is None and "adapter_model.safetensors" in e.error


def test_adapters_outside_lora_modules_are_refused_by_name(tmp_path):
    """An engine serving LoRA on q/v refuses o-targeting adapters, in memory or on disk,
    with an error that names the module; the pool keeps its pages."""
    from hf_files import write_peft_adapter
    ec = engine_config(num_pages=160, lora_modules=("q", "v"))
    lay = PoolLayout.create(MC, ec)
    alloc = PageAllocator(ec.num_pages)
    store = AdapterStore(MC, lay, alloc, max_rank=ec.max_rank)
    with pytest.raises(AdapterError, match=r"'k'.*k_proj"):
        store.register_dummy("d", 4, ("q", "k"))
    with pytest.raises(AdapterError, match=r"'o'.*o_proj"):
        store.register_adapter(dummy_adapter(MC, 4, ("q", "o"), name="mem"))
    write_peft_adapter(str(tmp_path / "disk"), dummy_adapter(MC, 4, ("o",), name="disk"), 8.0)
    store.register_dir(str(tmp_path))
    e = store.lookup("disk")
    store.load_sync(e)
    assert e.host is None and "o_proj" in e.error and "disk" in e.error
    assert alloc.num_free == alloc.capacity
    assert store.register_dummy("ok", 4, ("q", "v")).name == "ok"


def test_lora_path_must_stay_inside_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    ad = dummy_adapter(MC, 2, ("q", "v"), seed=1, name="x")
    save_peft_adapter(ad, str(root / "good"))
    save_peft_adapter(ad, str(outside / "evil"))
    os.symlink(outside / "evil", root / "link")
    store, *_ = make_store(allowed_roots=(str(root),))
    names = store.register_dir(str(root))
    assert names == ["good"]                         # the escaping symlink is skipped
    for bad in [str(outside / "evil"), str(root / ".." / "outside" / "evil"), str(root / "link"),
                "root/good"]:
        with pytest.raises(AdapterPathNotAllowed):
            store.register_path("y", bad)
    e = store.register_path("good2", str(root / "good"))
    assert e.host is not None                        # loaded at once: errors surface here


def test_no_roots_means_no_loading_by_path(tmp_path):
    store, *_ = make_store()
    with pytest.raises(AdapterPathNotAllowed, match="disabled"):
        store.register_path("x", str(tmp_path))


def test_pickled_adapters_are_refused(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "peft_type": "LORA"}')
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    store, *_ = make_store(allowed_roots=(str(tmp_path),))
    with pytest.raises(AdapterError, match="safetensors only"):
        store.register_path("pt", str(d))


def test_duplicate_and_bad_names(tmp_path):
    store, *_ = make_store()
    store.register_dummy("a", 4)
    with pytest.raises(AdapterError, match="already registered"):
        store.register_dummy("a", 4)
    with pytest.raises(AdapterError, match="not allowed"):
        store.register_dummy("a/b", 4)
    with pytest.raises(AdapterError, match="rank 64"):
        store.register_dummy("big", 64)


# --- host tier ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 8, 20, 65])
def test_adapter_copies_are_power_of_two_chunks_without_padding(n):
    from serving.adapter_store import chunk_sizes
    sizes = chunk_sizes(n, 8)
    assert sum(sizes) == n and all(s in (1, 2, 4, 8) for s in sizes)
    assert sizes == sorted(sizes, reverse=True)


def test_host_cache_keeps_to_its_budget_and_reloads():
    store, *_ = make_store()
    e0 = store.register_dummy("d0", 8, seed=0)
    store.load_sync(e0)
    one = e0.host.nbytes
    store.cfg = StoreConfig(host_cache_bytes=2 * one)
    es = [e0] + [store.register_dummy(f"d{i}", 8, seed=i) for i in range(1, 5)]
    for e in es[1:]:
        store.load_sync(e)
    st = store.stats()
    assert st["host"] == 2 and st["host_bytes"] <= 2 * one
    assert es[0].host is None and es[-1].host is not None      # least recently used went
    store.request_host(es[0])                                  # back from the disk tier
    wait_for(lambda: es[0].host is not None)


def test_preload_fills_the_host_tier_up_to_its_budget():
    store, *_ = make_store()
    for i in range(6):
        store.register_dummy(f"d{i}", 4, seed=i)
    assert store.preload() == 6
    store2, *_ = make_store(host_cache_bytes=1)
    for i in range(6):
        store2.register_dummy(f"d{i}", 4, seed=i)
    assert store2.preload() <= 1


def test_queued_requests_keep_their_host_copy():
    store, *_ = make_store()
    e0 = store.register_dummy("d0", 8)
    store.load_sync(e0)
    store.cfg = StoreConfig(host_cache_bytes=e0.host.nbytes)
    e0.wants = 1                                   # a queued request waits for it
    e1 = store.register_dummy("d1", 8, seed=1)
    store.load_sync(e1)
    assert e0.host is not None


# --- pool tier ------------------------------------------------------------------------------

MODS5 = ("q", "k", "v", "o", "gate")


def pages_of_rank8() -> int:
    _, _, lay = make_store()
    return lay.adapter_pages_for({m: 8 for m in MODS5})


def test_pool_tier_evicts_idle_adapters_lru_and_never_pinned_ones():
    store, ec, lay = make_store(num_pages=2 * pages_of_rank8() + 10)   # room for two
    es = [store.register_dummy(f"d{i}", 8, MODS5, seed=i)
          for i in range(3)]
    for e in es:
        store.load_sync(e)
    n = es[0].host.n_pages
    alloc = store.allocator
    store.make_resident(es[0])
    store.pin(es[0])
    store.make_resident(es[1])
    assert store.evictable_pages() == n and store.evictable_pages(exclude=es[1]) == 0
    assert alloc.num_free < n                      # no room for a third without evicting
    load = store.make_resident(es[2])              # evicts d1 (idle), not d0 (pinned)
    assert es[1].slot is None and es[0].slot is not None and es[2].slot is not None
    assert [len(p) for p in load.pages] == [c.shape[1] for c in load.chunks]
    assert sorted(np.concatenate(load.pages)) == sorted(alloc.pages(es[2].key))
    store.unpin(es[0])
    assert store.evict_idle() == 2 * n and alloc.num_free == alloc.capacity


def test_unregistered_adapter_leaves_the_pool_when_its_last_request_ends():
    store, *_ = make_store()
    e = store.register_dummy("d", 4)
    store.load_sync(e)
    store.make_resident(e)
    store.pin(e)
    store.unregister("d")
    store.collect_removed()
    assert e.slot is not None and "d" not in store
    store.unpin(e)
    assert e.slot is None and store.allocator.num_free == store.allocator.capacity


# --- scheduler --------------------------------------------------------------------------------

class Harness:
    """A scheduler over a real store and allocator; `step()` plays the engine's part."""

    def __init__(self, num_pages=160, **cfg):
        self.store, self.ec, self.lay = make_store(num_pages)
        self.failed = []
        self.sched = Scheduler(self.ec, self.lay, SchedulerConfig(**cfg), self.store.allocator,
                               self.store, on_fail=lambda s, e: self.failed.append((s, e)))

    def add(self, n_prompt=8, max_tokens=8, adapter=None, slo=None):
        e = None
        if adapter is not None:
            e = adapter if not isinstance(adapter, str) else self.store.lookup(adapter)
        t = now()
        seq = Seq(GenerationRequest([1] * n_prompt, max_tokens=max_tokens), None, e, t,
                  None if slo is None else t + slo)
        self.sched.add(seq)
        return seq

    def step(self):
        st = self.sched.schedule()
        if st is not None:
            for c in st.chunks:
                c.seq.n_prefilled = c.end
            for s in st.seqs + [c.seq for c in st.chunks if c.last]:
                s.n_dispatched += 1
                if s.n_dispatched == s.req.max_tokens:
                    self.sched.finish(s)
        return st


def admitted(st):
    return [c.seq for c in st.chunks]


def test_admission_reserves_prompt_plus_max_tokens():
    h = Harness(kv_pages="reserve")
    s = h.add(n_prompt=5, max_tokens=20)
    st = h.step()
    assert st.kind == "prefill" and admitted(st) == [s] and not st.seqs
    assert len(s.kv_pages) == h.lay.kv_pages_for(25)
    assert h.sched.kv_pages_used == len(s.kv_pages)
    for _ in range(5):
        h.step()
    assert len(s.kv_pages) == h.lay.kv_pages_for(25)          # it never grows


def test_on_demand_pages_follow_the_sequence():
    h = Harness()                                  # kv_pages="on_demand", the default
    tpp = h.lay.tokens_per_page
    s = h.add(n_prompt=5, max_tokens=20)
    h.step()                                       # the prefill writes positions 0..4
    assert len(s.kv_pages) == h.lay.kv_pages_for(5) and h.sched.kv_pages_used == 1
    for k in range(1, 15):                         # decode k writes position 5 + k - 1
        st = h.step()
        assert st.kind == "decode" and len(s.kv_pages) == -(-(5 + k) // tpp)
        assert h.sched.kv_pages_used == len(s.kv_pages) == len(set(s.kv_pages.tolist()))
    # Longer than a prefill step (max_prefill_tokens 64): still on demand (recomputed in
    # chunks if it is preempted), its pages taken chunk by chunk.
    long = h.add(n_prompt=100, max_tokens=30)
    h.step()
    assert long.on_demand and len(long.kv_pages) == h.lay.kv_pages_for(64)
    h.step()
    assert long.prefilled and len(long.kv_pages) == h.lay.kv_pages_for(100)
    assert h.sched.kv_pages_used == len(s.kv_pages) + len(long.kv_pages)


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_decode_rows():
    h = Harness(num_pages=400)                     # max_prefill_tokens 64
    old = h.add(n_prompt=5, max_tokens=30)
    h.step()
    long = h.add(n_prompt=150, max_tokens=4)
    short = h.add(n_prompt=10, max_tokens=4)
    spans = []
    for _ in range(3):
        st = h.step()
        assert st.kind == "prefill" and st.seqs == [old]     # decoding all along
        assert st.chunks[0].seq is long                      # continued: first in the step
        spans.append((st.chunks[0].start, st.chunks[0].end))
        assert sum(c.end - c.start for c in st.chunks) <= h.ec.max_prefill_tokens
        assert long.n_dispatched == (1 if st.chunks[0].last else 0)
    assert spans == [(0, 64), (64, 128), (128, 150)]
    # The short prompt waits behind the long one (first come, first served) and joins the
    # step that ends it, packed after it.
    assert admitted(st) == [long, short] and st.chunks[1].last and short.state == "running"
    st = h.step()
    assert st.kind == "decode" and st.seqs == [old, long, short]


def test_a_prompt_cancelled_between_its_chunks_frees_its_pages_and_is_not_continued():
    h = Harness(num_pages=400)                     # max_prefill_tokens 64
    long = h.add(n_prompt=150, max_tokens=4)
    short = h.add(n_prompt=10, max_tokens=4)
    st = h.step()
    assert admitted(st) == [long] and (st.chunks[0].start, st.chunks[0].end) == (0, 64)
    assert short.state == "waiting"
    free, pages = h.store.allocator.num_free, len(long.kv_pages)
    assert pages == h.lay.kv_pages_for(64)        # its first chunk's pages only
    h.sched.cancel(long)                           # its client leaves between two chunks
    assert h.store.allocator.num_free == free + pages and h.sched.kv_pages_used == 0
    st = h.step()                                  # nothing continues it; the next prompt
    assert admitted(st) == [short] and st.chunks[0].start == 0 and st.chunks[0].last
    assert long.state == "done" and long not in st.seqs and long not in h.sched.running


def test_a_continued_prompt_waits_for_its_pages_while_the_decode_rows_go_on():
    h = Harness(num_pages=30)                      # 29 pages of 6 tokens; 64-token steps
    old = h.add(n_prompt=60, max_tokens=50)
    h.step()
    long = h.add(n_prompt=130, max_tokens=2)
    st = h.step()
    assert admitted(st) == [long] and not st.chunks[0].last and len(long.kv_pages) == 11
    st = h.step()                                  # its next 64 tokens need 11 pages; 7 free
    assert st.kind == "decode" and st.seqs == [old] and not st.chunks
    assert long.state == "running" and long.n_prefilled == 64 and len(long.kv_pages) == 11
    preempted = False
    for _ in range(200):                           # the decode row grows into its pages:
        if h.step() is None:                       # the prompt is preempted, then served
            break
        preempted |= long.state == "waiting"
        assert h.sched.kv_pages_used <= 29
    assert preempted and old.state == long.state == "done" and not h.failed
    assert h.store.allocator.num_free == h.store.allocator.capacity


def test_a_dry_pool_preempts_the_youngest_which_goes_back_first_in_line():
    h = Harness(num_pages=20)                      # 19 pages of 6 tokens
    old, mid, young = (h.add(n_prompt=6, max_tokens=40) for _ in range(3))
    late = h.add(n_prompt=6, max_tokens=40)
    h.step()                                       # all four admitted, one page each
    assert [x.state for x in (old, mid, young, late)] == ["running"] * 4
    preempted = []
    for _ in range(40):
        if h.step() is None:
            break
        preempted += [x for x in (old, mid, young, late) if x.state == "waiting"
                      and x not in preempted]
        assert h.sched.kv_pages_used == sum(len(x.kv_pages) for x in h.sched.running)
        assert h.sched.kv_pages_used <= 19
    assert preempted and preempted[0] is late      # the youngest first, never the oldest
    assert old not in preempted
    assert h.sched.preemptions >= len(preempted)
    while h.step() is not None:                    # everyone finishes in the end
        pass
    assert all(x.state == "done" for x in (old, mid, young, late)) and not h.failed
    assert h.store.allocator.num_free == h.store.allocator.capacity


def test_first_come_first_served_on_memory():
    h = Harness(num_pages=20, kv_pages="reserve")                     # 19 pages, 6 tokens per page
    big = h.add(n_prompt=8, max_tokens=40)        # 8 pages
    h.add(n_prompt=8, max_tokens=40)
    blocked = h.add(n_prompt=8, max_tokens=40)    # does not fit beside the first two
    small = h.add(n_prompt=2, max_tokens=2)       # would fit, but must not overtake
    st = h.step()
    assert admitted(st) == [big, admitted(st)[1]] and blocked.state == small.state == "waiting"


def test_prefill_and_decode_alternate_while_requests_wait():
    h = Harness(decode_steps_per_prefill=1)
    for _ in range(12):
        h.add(n_prompt=4, max_tokens=30)
    kinds = [h.step().kind for _ in range(6)]
    assert kinds == ["prefill", "decode", "prefill", "decode", "prefill", "decode"]


def test_decode_runs_every_request_even_with_a_long_queue():
    h = Harness(decode_steps_per_prefill=3)
    for _ in range(40):
        h.add(n_prompt=4, max_tokens=30)
    kinds = []
    for _ in range(12):
        running = list(h.sched.running)
        st = h.step()
        kinds.append(st.kind)
        if st.kind == "decode":
            assert st.seqs == running          # every running request, every decode step
    assert kinds == ["prefill", "decode", "decode", "decode"] * 3


def test_cancel_frees_pages_at_once():
    h = Harness()
    a = h.add(max_tokens=30, adapter=None)
    h.step()
    free = h.store.allocator.num_free
    h.sched.cancel(a)
    assert h.store.allocator.num_free == free + len(a.kv_pages)
    assert h.sched.kv_pages_used == 0 and not h.sched.running


def test_early_abort_drops_requests_that_cannot_meet_the_slo():
    h = Harness()
    late = h.add(slo=0.0)
    ok = h.add(slo=60.0)
    time.sleep(0.001)
    h.sched.abort_late(now())
    assert [s for s, _ in h.failed] == [late] and isinstance(h.failed[0][1], SloAbort)
    # Predictive: 10 prefill steps of 1 s each ahead of the 11th request miss a 5 s SLO.
    h.sched.ema_prefill = 1.0
    seqs = [h.add(slo=5.0) for _ in range(44)]
    h.sched.abort_late(now())
    dropped = {id(s) for s, _ in h.failed}
    assert id(ok) not in dropped and id(seqs[0]) not in dropped and id(seqs[-1]) in dropped


def test_an_adapter_still_on_disk_does_not_block_the_queue():
    h = Harness()
    gate = threading.Event()

    class SlowSource:
        def load(self, mc, name, max_rank):
            gate.wait(10)
            return dummy_adapter(mc, 4, ("q",), name=name)

    slow = h.store._add("slow", SlowSource())
    h.store.register_dummy("fast", 4)
    h.store.load_sync(h.store.lookup("fast"))
    s_slow = h.add(adapter=slow)
    s_fast = h.add(adapter="fast")
    st = h.step()
    assert admitted(st) == [s_fast] and s_slow.state == "waiting" and st.loads
    gate.set()
    wait_for(lambda: slow.host is not None)
    h.sched.decodes_since_prefill = 1
    st = h.step()
    assert st.kind == "prefill" and admitted(st) == [s_slow]


def test_distinct_adapters_per_batch_are_bounded():
    h = Harness(num_pages=1024)
    for i in range(10):
        h.store.load_sync(h.store.register_dummy(f"d{i}", 1, ("q",), seed=i))
    for i in range(10):
        h.add(n_prompt=2, max_tokens=30, adapter=f"d{i}")
    for _ in range(6):
        h.step()
    assert len({s.entry for s in h.sched.running}) == h.ec.max_adapters_per_batch
    assert len(h.sched.waiting) == 10 - h.ec.max_adapters_per_batch


def test_prefetch_fills_free_pages_only():
    n = pages_of_rank8()
    h = Harness(num_pages=2 * n + 10)
    es = [h.store.register_dummy(f"d{i}", 8, MODS5, seed=i)
          for i in range(3)]
    for e in es:
        h.store.load_sync(e)
    seqs = [h.add(n_prompt=2, max_tokens=2, adapter=e) for e in es]
    loads = h.sched.prefetch()
    assert [ld.entry for ld in loads] == es[:2]          # the third does not fit in free pages
    assert all(s.state == "waiting" for s in seqs)
    assert h.store.evictable_pages() == 2 * es[0].host.n_pages
    assert h.store.allocator.num_free == 2 * n + 9 - 2 * n


def test_dummy_source_is_the_std_dummy_with_std_in_the_scale():
    """The server's dummies hold unit-variance windows of shared noise (views: no memory
    until packed) and carry std^2 in their scale: per module, scale * A^T B equals that of
    `dummy_adapter` with weights of that std (float64, to rounding)."""
    from serving.adapter_sources import DummySource
    std = 0.07
    fast = DummySource(4, ("q", "down"), seed=3, std=std).load(MC, "d", 16)
    ref = dummy_adapter(MC, 4, ("q", "down"), seed=3, std=std)
    for m in ("q", "down"):
        assert fast.scales[m] == pytest.approx(ref.scales[m] * std ** 2, rel=1e-12)
        for layer_f, layer_r in zip(fast.weights, ref.weights):
            (a_f, b_f), (a_r, b_r) = layer_f[m], layer_r[m]
            assert not a_f.flags.writeable and a_f.base is not None     # a view, shared
            got = fast.scales[m] * a_f.astype(np.float64).T @ b_f.astype(np.float64)
            want = ref.scales[m] * a_r.astype(np.float64).T @ b_r.astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError):
        fast.weights[0]["q"][0][0, 0] = 1.0         # the shared noise cannot be written


def test_early_abort_counts_the_prompt_tokens_ahead():
    """A step prefills at most max_prefill_tokens (64 here) and max_prefill_requests (4)
    prompts: behind three 60-token prompts a request waits three steps (184 tokens), where
    counting prompts alone would say two."""
    h = Harness()
    h.sched.ema_prefill = 1.0                      # seconds per prefill step
    long = [h.add(n_prompt=60, max_tokens=2, slo=100.0) for _ in range(3)]
    ok = h.add(n_prompt=4, max_tokens=2, slo=3.5)      # 3 steps: within 3.5 s
    late = h.add(n_prompt=4, max_tokens=2, slo=2.5)    # 3 steps (188 tokens) miss 2.5 s
    h.sched.abort_late(now())
    assert [s for s, _ in h.failed] == [late] and "estimated 3s more" in str(h.failed[0][1])
    assert all(x.state == "waiting" for x in long + [ok])
