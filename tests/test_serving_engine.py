"""The engine thread end to end (no HTTP): correctness under batching and memory pressure,
stop tokens with the host running a step ahead, cancellation, early abort, adapter failures.

Oracle: `dense_reference.dense_greedy` (numpy float64, whole sequence recomputed per
token). The engine runs float32 with "highest" matmul precision (conftest), so greedy
tokens agree exactly on the tiny random model (its logits are well separated).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from dense_reference import dense_greedy
from serving.engine import GenerationRequest, Sampling
from serving.requests import AdapterLoadFailed, InvalidRequest, SloAbort, UnknownAdapter
from test_serving_setup import MC, make_engine, params, write_adapters


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    adapters = write_adapters(root)
    eng = make_engine(root)
    yield eng, adapters
    eng.shutdown()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def idle(eng):
    wait_for(lambda: eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0)
    return eng.stats()


def random_requests(n, seed, names, max_tokens=(1, 10)):
    rng = np.random.default_rng(seed)
    return [GenerationRequest(prompt=[int(t) for t in rng.integers(0, MC.vocab_size,
                                                                   int(rng.integers(1, 13)))],
                              adapter=names[int(rng.integers(len(names)))],
                              max_tokens=int(rng.integers(*max_tokens)), sampling=Sampling())
            for _ in range(n)]


def test_mixed_batch_matches_dense_reference_under_memory_pressure(setup):
    eng, adapters = setup
    loads = eng.metrics.adapter_loads.labels(tier="pool")
    before = loads._value.get()
    reqs = random_requests(48, 0, [None] + sorted(adapters))
    streams = [eng.generate_sync(r) for r in reqs]
    results = [s.result() for s in streams]
    for r, (toks, lps, finish) in zip(reqs, results):
        ref, _ = dense_greedy(params(), MC, r.prompt, r.max_tokens,
                              adapters[r.adapter] if r.adapter else None)
        assert toks == ref, r.adapter
        assert finish == "length" and len(lps) == len(toks)
    # The 16 adapters (twice the pool) were evicted and paged in again.
    assert eng.metrics.adapter_evictions.labels(tier="pool")._value.get() > 0
    assert loads._value.get() - before > len(adapters)
    assert eng.compiled_since_warmup() == {"prefill_step": 0, "decode_step": 0,
                                           "load_adapter_pages": 0}
    st = idle(eng)
    assert st["pages"]["kv"] == 0
    eng.evict_idle_adapters()
    assert eng.allocator.num_free == eng.allocator.capacity


def test_stop_token_ends_the_request_and_its_run_ahead_step_is_dropped(setup):
    eng, adapters = setup
    prompt = [5, 9, 13, 2]
    full, _, _ = eng.generate_sync(GenerationRequest(prompt, "a04", max_tokens=12)).result()
    k = next(i for i in range(2, 12) if full[i] not in full[:i])   # first occurrence at k
    toks, _, finish = eng.generate_sync(GenerationRequest(
        prompt, "a04", max_tokens=12, stop_token_ids=frozenset({full[k]}))).result()
    assert toks == full[:k + 1] and finish == "stop"
    toks, _, finish = eng.generate_sync(GenerationRequest(
        prompt, "a04", max_tokens=12, stop_token_ids=frozenset({full[0]}))).result()
    assert toks == full[:1] and finish == "stop"          # stopped at the prefill's token
    assert idle(eng)["pages"]["kv"] == 0


def test_seeded_sampling_is_reproducible_in_any_batch(setup):
    eng, _ = setup
    req = lambda: GenerationRequest([3, 4, 5], "a07", max_tokens=10,
                                    sampling=Sampling(temperature=0.9, top_p=0.9, seed=7))
    alone = eng.generate_sync(req()).result()[0]
    others = [eng.generate_sync(r) for r in random_requests(10, 1, [None, "a01", "a07"])]
    within = eng.generate_sync(req()).result()[0]
    for s in others:
        s.result()
    assert alone == within


def test_cancel_frees_pages_at_once(setup):
    eng, _ = setup
    free0 = idle(eng)["pages"]["kv"]
    s = eng.generate_sync(GenerationRequest([1, 2, 3], "a02", max_tokens=40))
    first = s.get(timeout=30)
    assert first.token_ids and first.finish_reason is None
    assert eng.stats()["pages"]["kv"] > 0
    s.cancel()
    st = idle(eng)
    assert st["pages"]["kv"] == free0 == 0


def test_other_threads_never_see_a_request_gone_before_its_pages(setup, monkeypatch):
    """Engine.stats reads the scheduler from other threads without a lock, so the engine
    orders its writes: a request joins `running` before it leaves the queue, and its KV
    pages are freed before it leaves `running` (a reader that saw it gone and read the
    pages before they were freed made an idle check see leftover pages)."""
    eng, _ = setup
    sched, seen = eng.scheduler, []
    free, leave = sched.allocator.free, sched._leave_queue

    def watched_free(owner):
        seen.append(("free", any(q.kv_owner == owner for q in sched.running)))
        return free(owner)

    def watched_leave(seq):
        seen.append(("leave", seq in sched.running or seq.state != "waiting"))
        return leave(seq)
    monkeypatch.setattr(sched.allocator, "free", watched_free)
    monkeypatch.setattr(sched, "_leave_queue", watched_leave)
    idle(eng)
    done = eng.generate_sync(GenerationRequest([4, 5, 6], "a01", max_tokens=3))
    while done.get(timeout=30).finish_reason is None:
        pass
    s = eng.generate_sync(GenerationRequest([1, 2, 3], "a02", max_tokens=40))
    assert s.get(timeout=30).finish_reason is None
    s.cancel()
    assert idle(eng)["pages"]["kv"] == 0
    kinds = [k for k, _ in seen]
    assert kinds.count("leave") >= 2 and kinds.count("free") >= 2, seen
    assert all(ok for _, ok in seen), seen


def test_requests_that_cannot_meet_their_first_token_slo_are_dropped(setup):
    eng, _ = setup
    late = eng.generate_sync(GenerationRequest([1, 2], None, max_tokens=4, ttft_slo_s=0.0))
    ok = eng.generate_sync(GenerationRequest([1, 2], None, max_tokens=4, ttft_slo_s=60.0))
    with pytest.raises(SloAbort, match="SLO"):
        late.result()
    assert len(ok.result()[0]) == 4
    assert eng.metrics.rejected.labels(cause="slo_abort")._value.get() >= 1


@pytest.mark.parametrize("req,err,match", [
    (GenerationRequest([1, 2], "nope"), UnknownAdapter, "does not exist"),
    (GenerationRequest([1] * 48), InvalidRequest, "at most 47"),     # max_context 48
    (GenerationRequest([1] * 40, max_tokens=9), InvalidRequest, "context length"),
    (GenerationRequest([1, 500]), InvalidRequest, "outside the vocabulary"),
    (GenerationRequest([]), InvalidRequest, "empty"),
    (GenerationRequest([1], max_tokens=0), InvalidRequest, "max_tokens"),
    (GenerationRequest([1], sampling=Sampling(top_p=0.0)), InvalidRequest, "top_p"),
])
def test_bad_requests_are_refused_at_submit(setup, req, err, match):
    eng, _ = setup
    with pytest.raises(err, match=match):
        eng.generate_sync(req)
    assert eng.alive


def test_unloading_an_adapter_lets_its_requests_finish(setup, tmp_path):
    eng, adapters = setup
    from serving.adapter_store import save_peft_adapter
    root = os.path.dirname(eng.store.roots[0] + "/")
    save_peft_adapter(adapters["a03"], os.path.join(root, "tmp03"))
    eng.store.register_path("tmp03", os.path.join(root, "tmp03"))
    streams = [eng.generate_sync(GenerationRequest([7, 8, 9], "tmp03", max_tokens=6))
               for _ in range(3)]
    eng.store.unregister("tmp03")
    ref, _ = dense_greedy(params(), MC, [7, 8, 9], 6, adapters["a03"])
    for s in streams:
        assert s.result()[0] == ref
    with pytest.raises(UnknownAdapter):
        eng.generate_sync(GenerationRequest([7], "tmp03"))
    idle(eng)
    wait_for(lambda: all(e.name != "tmp03" for e in eng.store._pool))


def test_an_adapter_that_fails_to_load_fails_only_its_requests(setup, tmp_path):
    eng, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    eng.store.register_folder("bad", str(bad))
    s_bad = eng.generate_sync(GenerationRequest([1, 2], "bad", max_tokens=3))
    s_ok = eng.generate_sync(GenerationRequest([1, 2], "a00", max_tokens=3))
    with pytest.raises(AdapterLoadFailed, match="adapter_model.safetensors"):
        s_bad.result()
    assert len(s_ok.result()[0]) == 3
    eng.store.unregister("bad")


def test_a_pool_too_small_for_the_batch_preempts_and_no_output_changes(tmp_path):
    """KV pages on demand: 20 requests of up to 40 tokens want 140 KV pages from a pool of
    63 that also holds adapters, so requests are preempted and recomputed, with prefill
    steps of 8 tokens (so recomputed prompts, and a few first ones, are prefilled in
    chunks, each taking its pages as it goes); greedy outputs equal the float64 reference,
    seeded ones the same requests' run without pressure, and every page comes back."""
    root = str(tmp_path)
    adapters = write_adapters(root)
    names = [None, "a00", "a10", "a15"]
    rng = np.random.default_rng(5)
    reqs = [GenerationRequest(
        prompt=[int(t) for t in rng.integers(0, MC.vocab_size, int(rng.integers(2, 10)))],
        adapter=names[i % len(names)], max_tokens=30,
        sampling=Sampling(temperature=0.8, seed=i) if i % 5 == 4 else Sampling())
        for i in range(20)]
    small = make_engine(root, num_pages=64, max_prefill_tokens=8, prefill_token_buckets=(8,))
    try:
        got = [s.result() for s in [small.generate_sync(r) for r in reqs]]
        n_preempted = small.stats()["preemptions"]
        assert n_preempted > 0
        # The seeded requests again, alone: the pool holds them all at once.
        seeded = [r for r in reqs if r.sampling.temperature > 0]
        want = {id(r): s.result() for r, s in [(r, small.generate_sync(r)) for r in seeded]}
        assert small.stats()["preemptions"] == n_preempted
        assert small.compiled_since_warmup() == {"prefill_step": 0, "decode_step": 0,
                                                 "load_adapter_pages": 0}
        assert idle(small)["pages"]["kv"] == 0
        small.evict_idle_adapters()
        assert small.allocator.num_free == small.allocator.capacity
    finally:
        small.shutdown()
    for r, (toks, lps, finish) in zip(reqs, got):
        assert finish == "length" and len(toks) == len(lps) == 30   # none streamed twice
        if r.sampling.temperature == 0:
            ref, _ = dense_greedy(params(), MC, r.prompt, r.max_tokens,
                                  adapters[r.adapter] if r.adapter else None)
            assert toks == ref, r.adapter
        else:
            assert toks == want[id(r)][0], r


class _Collect:
    """A stream whose outputs land in a list (the test drives the engine's loop by hand)."""

    def __init__(self):
        self.channel = self
        self.tokens: list[int] = []

    def deliver(self, items):
        for stream, out in items:
            stream.tokens += out.token_ids


def test_a_preempted_request_readmitted_before_its_step_is_read_back_gets_no_stale_token():
    """The loop dispatches step n before it reads step n-1 back: a request preempted and
    re-admitted in between must not receive n-1's token (the epoch), and its output is the
    float64 reference's, each token once."""
    from serving.scheduler import Seq
    eng = make_engine(None, num_pages=200)        # warm, and its thread stopped at once
    eng.shutdown()
    sched = eng.scheduler
    reqs = [GenerationRequest([7, 3, 9, 4], None, max_tokens=6),
            GenerationRequest([2, 8, 5], None, max_tokens=6)]
    seqs = [Seq(r, _Collect(), None, time.monotonic(), None) for r in reqs]
    for s in seqs:
        sched.add(s)
    a, b = seqs
    run = lambda: eng._dispatch(sched.schedule())
    done = lambda inf: (eng._complete(inf), eng._flush())
    done(run())                                    # prefill a and b: one token each
    in_flight = run()                              # decode a and b, not read back yet
    assert sched._preempt_youngest() and b.state == "waiting"
    readmit = run()                                # b's recompute, dispatched at once
    assert readmit.kind == "prefill" and readmit.seqs == [a, b] and b.state == "running"
    done(in_flight)                                # b's stale token must be dropped
    assert len(b.stream.tokens) == 1 and len(a.stream.tokens) == 2
    inf = readmit
    for _ in range(50):                            # the engine's loop: dispatch, then read back
        step = sched.schedule()
        nxt = eng._dispatch(step) if step is not None else None
        done(inf)
        inf = nxt
        if inf is None:
            break
    for s in seqs:
        ref, _ = dense_greedy(params(), MC, s.req.prompt, s.req.max_tokens, None)
        assert s.stream.tokens == ref and s.state == "done"
    assert sched.preemptions == 1 and eng.allocator.num_free == eng.allocator.capacity
