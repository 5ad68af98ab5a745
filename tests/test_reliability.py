"""No request can take the engine down or reach another request: the server under hostile input.

One warm engine over the tiny GQA model behind a real uvicorn server (as in
test_server_http). Each test throws one kind of bad input at it and then checks
that the engine still serves; the soak test mixes all of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetensors.numpy import load_file, save_file

from serving.adapter_store import StoreConfig
from serving.engine import AsyncStream, Engine, Output, SyncStream
from serving.offline import OfflineEngine, Request, RequestError as OfflineRequestError
from serving.protocol import TextCodec
from serving.requests import EngineInfo, GenerationRequest, InvalidRequest, Unavailable
from serving.scheduler import Seq
from serving.server import ServerThread, create_app
from slora_jax.batching import Sampling
from test_serving_setup import MC, engine_config, make_engine, params, write_adapters

BASE = "tiny-gqa"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    write_adapters(root)
    eng = make_engine(root)
    server = ServerThread(create_app(eng, TextCodec(), BASE, max_body_bytes=1 << 20)).start()
    yield {"eng": eng, "url": server.url, "root": root}
    server.stop()
    eng.shutdown()


def post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kw)


def greedy(url, model, prompt, n=5):
    r = post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n,
                                      "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def healthy(url):
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert len(greedy(url, "a01", [1, 2, 3], 3).split()) == 3


def wait_idle(eng, timeout=20.0):
    deadline = time.monotonic() + timeout
    while eng.stats()["running"] or eng.stats()["waiting"]:
        assert time.monotonic() < deadline, eng.stats()
        time.sleep(0.01)
    return eng.stats()


# --- numbers the device cannot hold are refused at the boundary -----------------------

@pytest.mark.parametrize("field,value", [
    ("top_k", 3_000_000_000), ("top_k", 2**31), ("max_tokens", 2**40), ("seed", 2**64),
    ("temperature", 1e39), ("top_p", 0.0), ("ttft_slo_s", -1.0), ("ttft_slo_s", 1e9)])
def test_out_of_range_numbers_are_400_naming_the_field(srv, field, value):
    r = post(srv["url"], "/v1/completions", {"model": BASE, "prompt": [1, 2, 3], "max_tokens": 4,
                                             field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    healthy(srv["url"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_floats_are_400(srv, literal):
    body = '{"model": "%s", "prompt": [1, 2], "max_tokens": 2, "temperature": %s}' % (BASE,
                                                                                     literal)
    r = httpx.post(f"{srv['url']}/v1/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    healthy(srv["url"])


@pytest.mark.parametrize("sampling,field", [
    (Sampling(top_k=3_000_000_000), "top_k"), (Sampling(temperature=float("nan")), "temperature"),
    (Sampling(top_p=float("inf")), "top_p"), (Sampling(seed=2**70), "seed"),
    (Sampling(top_k=1.5), "top_k")])
def test_engine_refuses_what_its_arrays_cannot_hold(srv, sampling, field):
    """The engine's own entry (used by scripts and the offline path), not only HTTP."""
    eng = srv["eng"]
    with pytest.raises(InvalidRequest) as e:
        eng.generate_sync(GenerationRequest(prompt=[1, 2, 3], max_tokens=2, sampling=sampling))
    assert e.value.param == field
    toks, _, _ = eng.generate_sync(GenerationRequest(prompt=[1, 2, 3], max_tokens=2)).result()
    assert len(toks) == 2 and eng.alive


def test_offline_requests_are_checked_like_the_server_s():
    eng = OfflineEngine(params(), MC, engine_config(), np.float32)
    with pytest.raises(OfflineRequestError, match="top_k"):
        eng.validate(Request("r", [1, 2, 3], max_tokens=2, sampling=Sampling(top_k=2**40)))
    with pytest.raises(OfflineRequestError, match="temperature"):
        eng.validate(Request("r", [1, 2, 3], max_tokens=2,
                             sampling=Sampling(temperature=float("inf"))))


def test_tiny_temperatures_sample_greedily(srv):
    url = srv["url"]
    want = greedy(url, "a02", [5, 6, 7], 5)
    r = post(url, "/v1/completions", {"model": "a02", "prompt": [5, 6, 7], "max_tokens": 5,
                                      "temperature": 1e-30, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


_NUMS = st.one_of(st.integers(-2**80, 2**80), st.floats(allow_nan=True, allow_infinity=True),
                  st.booleans(), st.none(), st.text(max_size=5),
                  st.lists(st.integers(-2**40, 2**40), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(
    ["max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "n", "ttft_slo_s",
     "stop_token_ids", "prompt", "presence_penalty", "stop", "stream"]), _NUMS, min_size=1,
    max_size=4))
def test_property_random_fields_get_4xx_or_200_never_5xx(srv, fields):
    body = {"model": random.choice([BASE, "a03"]), "prompt": [1, 2, 3], "max_tokens": 2,
            **fields}
    if body.get("stream") is True:
        body["stream"] = False       # the status code is what is checked here
    r = httpx.post(f"{srv['url']}/v1/completions", timeout=60,
                   content=json.dumps(body, allow_nan=True),
                   headers={"Content-Type": "application/json"})
    # The one documented 5xx: a valid first-token SLO too short to meet (early abort).
    slo_abort = (r.status_code == 503 and "ttft_slo_s" in body
                 and r.json()["error"]["code"] == "slo_abort")
    assert r.status_code == 200 or 400 <= r.status_code < 500 or slo_abort, (
        body, r.status_code, r.text)
    assert srv["eng"].alive


# --- a failing engine loop exits instead of answering 503 forever ------------------------

def test_engine_loop_failure_fails_requests_and_calls_on_fatal():
    fatal = []
    eng = Engine(params(), MC, engine_config(), dtype=np.float32,
                 on_fatal=lambda e: fatal.append(e))
    eng.warmup(progress=False)

    schedule = eng.scheduler.schedule

    def broken(*a, **k):           # an engine bug that shows once a request is queued
        if eng.scheduler.waiting:
            raise RuntimeError("injected")
        return schedule(*a, **k)
    eng.scheduler.schedule = broken
    eng.start()
    try:
        s = eng.generate_sync(GenerationRequest(prompt=[1, 2, 3], max_tokens=2))
        with pytest.raises(Unavailable, match="the engine failed") as e:
            s.result(timeout=30)
        assert "injected" not in e.value.message          # no internals to the client
        eng._thread.join(10)
        assert len(fatal) == 1 and isinstance(fatal[0], RuntimeError) and not eng.alive
    finally:
        eng.shutdown()


# --- non-finite logprobs are JSON null ------------------------------------------------------

class _NanEngine:
    """The server's engine surface, answering every request with NaN/inf logprobs."""
    info = EngineInfo(model_name=BASE, vocab_size=MC.vocab_size, max_context=64,
                      max_prompt_tokens=64)
    alive = True

    def __init__(self):
        self.cancelled: list[str] = []
        self.silent = False           # True: never answer (a request stuck in the queue)

    def generate(self, req):
        s = AsyncStream(self, asyncio.get_running_loop())
        s.request_id = req.id
        if not self.silent:
            s.push(Output([7, 8], [float("nan"), float("-inf")], None, num_prompt_tokens=3))
            s.push(Output([9], [-0.5], "length", num_prompt_tokens=3))
        return s

    def cancel(self, request_id):
        self.cancelled.append(request_id)

    async def adapter_names(self):
        return []

    async def metrics_text(self):
        return b""


@pytest.fixture(scope="module")
def nan_srv():
    eng = _NanEngine()
    server = ServerThread(create_app(eng, TextCodec(), BASE)).start()
    yield eng, server.url
    server.stop()


def test_nan_logprobs_are_null_through_the_openai_client(nan_srv):
    _, url = nan_srv
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(model=BASE, prompt=[1, 2, 3], max_tokens=3, logprobs=1)
    assert r.choices[0].logprobs.token_logprobs == [None, None, -0.5]
    parts = list(client.completions.create(model=BASE, prompt=[1, 2, 3], max_tokens=3,
                                           logprobs=1, stream=True))
    lps = [x for p in parts for x in (p.choices[0].logprobs.token_logprobs if p.choices and
                                      p.choices[0].logprobs else [])]
    assert lps == [None, None, -0.5]
    chat = client.chat.completions.create(model=BASE, max_tokens=3, logprobs=True,
                                          messages=[{"role": "user", "content": "1 2 3"}])
    assert [c.logprob for c in chat.choices[0].logprobs.content] == [None, None, -0.5]
    chunks = list(client.chat.completions.create(model=BASE, max_tokens=3, logprobs=True,
                                                 stream=True,
                                                 messages=[{"role": "user", "content": "1"}]))
    got = [c.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
           for c in ch.choices[0].logprobs.content]
    assert got == [None, None, -0.5]


def test_streamed_frames_are_valid_json(nan_srv):
    _, url = nan_srv
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
            "model": BASE, "prompt": [1], "max_tokens": 3, "logprobs": 1, "stream": True}) as r:
        frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    for f in frames[:-1]:
        json.loads(f, parse_constant=lambda c: pytest.fail(f"bare {c} in a frame: {f}"))


def test_client_leaving_before_its_first_token_cancels_the_request(nan_srv):
    eng, url = nan_srv
    eng.silent, n0 = True, len(eng.cancelled)
    try:
        async def leave():
            async with httpx.AsyncClient(timeout=30) as c:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.post(f"{url}/v1/completions", json={
                        "model": BASE, "prompt": [1], "max_tokens": 3, "stream": True}), 0.3)
        asyncio.run(leave())
        deadline = time.monotonic() + 2.0
        while len(eng.cancelled) == n0:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.02)
    finally:
        eng.silent = False


# --- request bodies and adapter names ---------------------------------------------------------

def test_oversized_body_is_413(srv):
    url = srv["url"]
    big = {"model": BASE, "prompt": [1] * 700_000, "max_tokens": 2}
    r = post(url, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():                       # no Content-Length: counted as it streams
        yield b'{"model": "%s", "prompt": "' % BASE.encode()
        for _ in range(40):
            yield b"1 " * 16384
        yield b'", "max_tokens": 2}'
    r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    healthy(url)


def test_adapter_name_with_control_characters_is_refused(srv, caplog):
    url, root = srv["url"], srv["root"]
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "x\nFORGED log line",
                                            "lora_path": f"{root}/a01"})
    assert r.status_code == 400, r.text
    assert "FORGED" not in "".join(m for m in caplog.messages if "\n" in m)


# --- per-request first-token SLO ------------------------------------------------------------

def test_per_request_ttft_slo_aborts_only_that_request(srv):
    url = srv["url"]
    r = post(url, "/v1/completions", {"model": "a04", "prompt": [1, 2, 3], "max_tokens": 3,
                                      "ttft_slo_s": 1e-9})
    assert r.status_code == 503 and r.json()["error"]["code"] == "slo_abort"
    r = post(url, "/v1/completions", {"model": "a04", "prompt": [1, 2, 3], "max_tokens": 3,
                                      "ttft_slo_s": 60})
    assert r.status_code == 200


# --- unloading an adapter whose requests are still queued leaves nothing behind -------------

def test_unload_with_a_queued_request_then_cancel_leaves_nothing_resident(tmp_path):
    """The engine loop's order, step by step on the host (no device step needed)."""
    root = str(tmp_path)
    write_adapters(root)
    eng = Engine(params(), MC, engine_config(), dtype=np.float32,
                 store_config=StoreConfig(allowed_roots=(root,)))
    eng.store.register_dir(root)
    e = eng.store.lookup("a07")
    eng.store.load_sync(e)
    # The engine thread is not started: the loop's calls are made here, in its order.
    req = GenerationRequest(prompt=[1, 2], adapter="a07", max_tokens=3)
    seq = Seq(req=req, stream=SyncStream(eng), entry=eng.validate(req), arrival=0.0,
              deadline=None)
    eng._inbox.append(("submit", seq))
    eng._drain()
    assert eng.scheduler.waiting[0] is seq
    for load in eng.scheduler.prefetch():          # prefetched into the pool (idle)
        eng._write(load)
    assert e.slot is not None
    eng.store.unregister("a07")
    eng.store.collect_removed()
    for load in eng.scheduler.prefetch():          # the queued request still wants it
        eng._write(load)
    eng.cancel(seq.req.id)                         # ... and its client leaves
    eng._drain()
    assert e.slot is None and e.host is None
    assert eng.store.stats()["pool"] == 0 and eng.store.stats()["host"] == 0
    assert eng.allocator.num_free == eng.allocator.capacity
    eng.store.shutdown()


# --- the soak: everything at once, and then the same tokens as before ------------------------

_INVALID = [("top_k", 2**40), ("max_tokens", 10**6), ("top_p", 2.0), ("model", "nope"),
            ("prompt", [MC.vocab_size + 5]), ("temperature", -1), ("seed", "x"), ("n", 0)]


def poisoned_copies(src: str, root: str) -> list[str]:
    """Copies of the PEFT folder `src` under `root` that no engine may load: a NaN, an inf,
    every tensor times 1e25, and configs of the wrong types."""
    tensors = load_file(f"{src}/adapter_model.safetensors")
    with open(f"{src}/adapter_config.json") as f:
        cfg = json.load(f)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    variants = {
        "nan": (lambda t: {**t, key: np.where(np.arange(t[key].size).reshape(t[key].shape) == 0,
                                              np.nan, t[key]).astype(t[key].dtype)}, cfg),
        "inf": (lambda t: {**t, key: np.full_like(t[key], np.inf)}, cfg),
        "huge": (lambda t: {k: (v * 1e25).astype(v.dtype) for k, v in t.items()}, cfg),
        "r_str": (lambda t: t, {**cfg, "r": "eight"}),
        "alpha_null": (lambda t: t, {**cfg, "lora_alpha": None}),
        "list": (lambda t: t, [cfg]),
    }
    out = []
    for name, (f, c) in variants.items():
        d = f"{root}/poison-{name}"
        os.makedirs(d, exist_ok=True)
        save_file(f(dict(tensors)), f"{d}/adapter_model.safetensors")
        with open(f"{d}/adapter_config.json", "w") as fh:
            json.dump(c, fh)
        out.append(d)
    return out


def test_soak_500_mixed_requests(srv, tmp_path):
    """Valid, invalid, cancelled mid-stream and poisoned-adapter requests, with adapters
    loaded and unloaded while they run; afterwards the server is healthy, every page not
    held by a resident adapter is free, and greedy outputs are unchanged."""
    url, eng, root = srv["url"], srv["eng"], srv["root"]
    fixed = [("a00", [1, 2, 3]), ("a05", [9, 8, 7, 6]), (BASE, [4, 4, 4]), ("a11", [2, 7])]
    before = [greedy(url, m, p, 6) for m, p in fixed]
    compiled = eng._cache_sizes()        # other tests' engines may have compiled other shapes
    bad_roots = poisoned_copies(f"{root}/a03", root)
    rng = np.random.default_rng(0)
    names = [f"a{i:02d}" for i in range(16)]
    counts: dict[str, int] = {}

    async def one(c: httpx.AsyncClient, i: int):
        kind = ["valid", "valid", "valid", "invalid", "cancel", "stream", "poison", "lora"][i % 8]
        counts[kind] = counts.get(kind, 0) + 1
        prompt = [int(t) for t in rng.integers(0, MC.vocab_size, int(rng.integers(1, 10)))]
        model = names[int(rng.integers(0, 16))] if rng.random() < 0.8 else BASE
        body = {"model": model, "prompt": prompt, "max_tokens": int(rng.integers(1, 8)),
                "temperature": float(rng.choice([0.0, 0.7])), "seed": int(i)}
        if kind == "invalid":
            field, value = _INVALID[i // 8 % len(_INVALID)]
            r = await c.post(f"{url}/v1/completions", json={**body, field: value})
            assert 400 <= r.status_code < 500, r.text
        elif kind in ("cancel", "stream"):
            body.update(stream=True, max_tokens=20, ignore_eos=True)
            async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.status_code in (200, 404), await r.aread()
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if kind == "cancel" and n == 2:
                        break                       # leave mid-stream
        elif kind == "poison":
            r = await c.post(f"{url}/v1/load_lora_adapter", json={
                "lora_name": f"bad{i}", "lora_path": bad_roots[i % len(bad_roots)]})
            assert r.status_code == 400, r.text
        elif kind == "lora":
            name = f"extra{i}"
            r = await c.post(f"{url}/v1/load_lora_adapter",
                             json={"lora_name": name, "lora_path": f"{root}/a{i % 16:02d}"})
            assert r.status_code == 200, r.text
            r = await c.post(f"{url}/v1/completions", json={**body, "model": name})
            assert r.status_code in (200, 404), r.text
            r = await c.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name})
            assert r.status_code == 200, r.text
        else:
            r = await c.post(f"{url}/v1/completions", json=body)
            assert r.status_code in (200, 404, 429), r.text

    async def run():
        sem = asyncio.Semaphore(24)
        async with httpx.AsyncClient(timeout=120) as c:
            async def guarded(i):
                async with sem:
                    await one(c, i)
            await asyncio.wait_for(asyncio.gather(*(guarded(i) for i in range(500))), 240)
    asyncio.run(run())
    assert sum(counts.values()) == 500
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    st_ = wait_idle(eng)
    assert st_["pages"]["kv"] == 0
    held = sum(len(e.slot.pages) for e in list(eng.store._pool))
    assert eng.allocator.num_free == eng.allocator.capacity - held
    assert [greedy(url, m, p, 6) for m, p in fixed] == before
    assert eng._cache_sizes() == compiled           # the serving loop compiled nothing
