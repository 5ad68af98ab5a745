"""The HTTP server for real: uvicorn on 127.0.0.1 (a free port), httpx and the openai client.

One engine per module (the pool too small for its 16 adapters and 64 concurrent
requests), served twice: as token ids (no tokenizer) and through a WordLevel
tokenizer with a chat template. Every bad request is followed by a good one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import openai
import pytest

from dense_reference import dense_greedy
from serving.adapter_store import save_peft_adapter
from serving.protocol import TextCodec
from serving.server import ServerThread, create_app
from test_serving_setup import MC, make_engine, params, write_adapters

BASE = "tiny-gqa"
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")


def word_codec(tmp) -> TextCodec:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]", "<s>", "</s>", "user", "assistant", "system"] + [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}, f)
    return TextCodec.from_dir(tmp)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    adapters = write_adapters(root)
    eng = make_engine(root)
    ids = ServerThread(create_app(eng, TextCodec(), BASE)).start()
    words = ServerThread(create_app(eng, word_codec(str(tmp_path_factory.mktemp("tok"))),
                                    BASE)).start()
    yield {"eng": eng, "url": ids.url, "words": words.url, "adapters": adapters, "root": root}
    ids.stop()
    words.stop()
    eng.shutdown()


def post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kw)


def complete(url, model, prompt, max_tokens=6, **kw):
    r = post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                      "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def still_serving(url):
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert len(ids_of(complete(url, "a00", [1, 2, 3], 3)["choices"][0]["text"])) == 3


def wait_idle(eng, timeout=10.0):
    deadline = time.monotonic() + timeout
    while eng.stats()["running"] or eng.stats()["waiting"]:
        assert time.monotonic() < deadline, eng.stats()
        time.sleep(0.01)
    return eng.stats()


# --- batching correctness and memory -----------------------------------------------------

def test_64_concurrent_requests_over_16_adapters_match_single_requests(srv):
    eng, url, adapters = srv["eng"], srv["url"], srv["adapters"]
    names = sorted(adapters)
    import numpy as np
    rng = np.random.default_rng(3)
    reqs = [{"model": names[i % 16], "max_tokens": int(rng.integers(3, 9)), "temperature": 0,
             "prompt": [int(t) for t in rng.integers(0, MC.vocab_size, int(rng.integers(1, 12)))]}
            for i in range(64)]

    async def fire():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/completions", json=r) for r in reqs))
    outs = asyncio.run(fire())
    assert all(o.status_code == 200 for o in outs)
    got = [ids_of(o.json()["choices"][0]["text"]) for o in outs]
    for r, toks in zip(reqs, got):                       # the float64 dense oracle
        ref, _ = dense_greedy(params(), MC, r["prompt"], r["max_tokens"], adapters[r["model"]])
        assert toks == ref, r["model"]
    for r, toks in list(zip(reqs, got))[:16]:            # and each one alone, one per adapter
        assert ids_of(complete(url, r["model"], r["prompt"], r["max_tokens"])["choices"][0]
                      ["text"]) == toks
    assert eng.compiled_since_warmup() == {"prefill_step": 0, "decode_step": 0,
                                           "load_adapter_pages": 0}
    # Memory pressure: adapters were evicted and paged in again; all pages come back.
    assert eng.metrics.adapter_evictions.labels(tier="pool")._value.get() > 0
    assert wait_idle(eng)["pages"]["kv"] == 0
    eng.evict_idle_adapters()
    assert eng.allocator.num_free == eng.allocator.capacity


def test_cancelled_stream_frees_its_pages(srv, monkeypatch):
    eng, url = srv["eng"], srv["url"]
    wait_idle(eng)
    # Each step is read back 20 ms late, so the request cannot reach its 40th token before
    # the server has seen the client go, however loaded the machine.
    complete = eng._complete

    def slow(inf):
        time.sleep(0.02)
        complete(inf)
    monkeypatch.setattr(eng, "_complete", slow)
    finished = {k: eng.metrics.finished.labels(reason=k)._value.get() for k in ("abort", "length")}
    for n in (1, 3):                              # a request's n samples all end with it
        body = {"model": "a05", "prompt": [4, 5, 6], "max_tokens": 40, "temperature": 0,
                "stream": True, "ignore_eos": True, "n": n}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert eng.stats()["pages"]["kv"] > 0
        st = wait_idle(eng)                       # the disconnect cancelled the request
        assert st["pages"]["kv"] == 0
        aborted = eng.metrics.finished.labels(reason="abort")._value.get()
        assert aborted == finished["abort"] + n
        finished["abort"] = aborted
        assert eng.metrics.finished.labels(reason="length")._value.get() == finished["length"]
    still_serving(url)


# --- the OpenAI API -------------------------------------------------------------------------

def test_openai_client_streaming_matches_non_streaming(srv):
    client = openai.OpenAI(base_url=f"{srv['url']}/v1", api_key="none", max_retries=0)
    full = client.completions.create(model="a04", prompt=[3, 1, 4, 1, 5], max_tokens=7,
                                     temperature=0)
    parts = list(client.completions.create(model="a04", prompt=[3, 1, 4, 1, 5], max_tokens=7,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert text == full.choices[0].text and len(ids_of(text)) == 7
    assert parts[-1].usage.completion_tokens == 7 and parts[-1].usage.prompt_tokens == 5
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "length"
    assert full.usage.total_tokens == 12
    # Chat without a tokenizer: message contents are token ids.
    chat = client.chat.completions.create(model="a09", max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "3 1 4 1 5"}])
    deltas = [c.choices[0].delta for c in client.chat.completions.create(
        model="a09", max_tokens=5, temperature=0, stream=True,
        messages=[{"role": "user", "content": "3 1 4 1 5"}])]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content


def test_a_list_of_prompts_gives_one_choice_each(srv):
    out = complete(srv["url"], "a08", [[1, 2], [3, 4, 5], [6]], 4)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for c, p in zip(out["choices"], [[1, 2], [3, 4, 5], [6]]):
        assert c["text"] == complete(srv["url"], "a08", p, 4)["choices"][0]["text"]
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}


def test_n_samples_per_prompt_each_as_its_own_seeded_request(srv):
    """n=3: three choices; the j-th is what one request seeded with sample_seed(seed, j)
    gives (the first: the request's own seed), so n=1 is unchanged and n is reproducible."""
    from serving.requests import sample_seed
    url, seed = srv["url"], random.getrandbits(40)
    body = dict(temperature=1.5, seed=seed, ignore_eos=True)
    out = complete(url, "a05", [4, 2], 8, n=3, **body)
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    for j, t in enumerate(texts):
        one = complete(url, "a05", [4, 2], 8, **{**body, "seed": sample_seed(seed, j)})
        assert one["choices"][0]["text"] == t
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 24, "total_tokens": 26}
    # several prompts: prompt i's j-th sample is choice i * n + j
    many = complete(url, "a05", [[4, 2], [7]], 8, n=2, **body)["choices"]
    assert [c["index"] for c in many] == [0, 1, 2, 3]
    assert [many[0]["text"], many[1]["text"]] == texts[:2]
    assert many[2]["text"] == complete(url, "a05", [7], 8, **body)["choices"][0]["text"]
    # greedy samples agree
    greedy = {c["text"] for c in complete(url, "a05", [4, 2], 5, n=2)["choices"]}
    assert greedy == {complete(url, "a05", [4, 2], 5)["choices"][0]["text"]}
    assert wait_idle(srv["eng"])["pages"]["kv"] == 0


def test_n_streams_every_choice_through_the_openai_client(srv):
    client = openai.OpenAI(base_url=f"{srv['url']}/v1", api_key="none", max_retries=0)
    kw = dict(model="a07", max_tokens=6, temperature=1.2, seed=random.getrandbits(31), n=3,
              extra_body={"ignore_eos": True})
    full = client.completions.create(prompt=[3, 5, 8], **kw)
    parts = list(client.completions.create(prompt=[3, 5, 8], stream=True,
                                           stream_options={"include_usage": True}, **kw))
    text, finish = {}, {}
    for p in parts:
        for c in p.choices:
            text[c.index] = text.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert text == {c.index: c.text for c in full.choices}
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert parts[-1].usage.completion_tokens == 18 == full.usage.completion_tokens
    msgs = [{"role": "user", "content": "3 5 8"}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert [c.message.content for c in chat.choices] == [c.text for c in full.choices]
    streamed, roles = {}, {}
    for p in client.chat.completions.create(messages=msgs, stream=True, **kw):
        for c in p.choices:
            roles.setdefault(c.index, c.delta.role)
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert streamed == {c.index: c.message.content for c in chat.choices}


def test_echo_puts_each_prompt_before_its_completions(srv):
    url, words = srv["url"], srv["words"]
    plain = [complete(url, "a02", p, 5)["choices"][0]["text"] for p in ([4, 2], [7, 1, 3])]
    out = complete(url, "a02", [[4, 2], [7, 1, 3]], 5, n=2, echo=True)["choices"]
    assert [c["text"] for c in out] == ["4 2 " + plain[0]] * 2 + ["7 1 3 " + plain[1]] * 2
    r = post(url, "/v1/completions", {"model": "a02", "prompt": [4, 2], "max_tokens": 5,
                                      "temperature": 0, "echo": True, "stream": True})
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "4 2 " + plain[0]
    # with a tokenizer: the prompt string as given
    t = complete(words, "a02", "w3 w4", 3, echo=True, ignore_eos=True)["choices"][0]["text"]
    assert t == "w3 w4" + complete(words, "a02", "w3 w4", 3,
                                   ignore_eos=True)["choices"][0]["text"]
    r = post(url, "/v1/completions", {"model": "a02", "prompt": [4, 2], "echo": True,
                                      "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_best_of_keeps_the_samples_of_highest_cumulative_logprob(srv):
    url = srv["url"]
    body = dict(temperature=1.5, seed=random.getrandbits(31), ignore_eos=True, logprobs=0)
    samples = complete(url, "a04", [6, 1], 6, n=4, **body)["choices"]
    ranked = sorted(samples, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    for n in (1, 2):
        out = complete(url, "a04", [6, 1], 6, n=n, best_of=4, **body)
        assert [c["text"] for c in out["choices"]] == [c["text"] for c in ranked[:n]]
        assert [c["index"] for c in out["choices"]] == list(range(n))
        assert out["usage"]["completion_tokens"] == 24        # every sample counts


def test_prompts_are_tokenized_off_the_event_loop(srv, monkeypatch, tmp_path):
    """Tokenizing a long prompt (seconds for a few MiB) runs on a worker thread, with the
    tokenizer's lock-free batch call, so the event loop keeps streaming everyone else."""
    import threading

    import serving.protocol as protocol
    threads = []
    encode, render = protocol.TextCodec.encode, protocol.TextCodec.render_chat

    def spy(fn):
        def wrapped(*a, **kw):
            threads.append(threading.current_thread().name)
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(protocol.TextCodec, "encode", spy(encode))
    monkeypatch.setattr(protocol.TextCodec, "render_chat", spy(render))
    words = srv["words"]
    client = openai.OpenAI(base_url=f"{words}/v1", api_key="none", max_retries=0)
    client.completions.create(model="a02", prompt="w3 w4", max_tokens=2)
    client.chat.completions.create(model="a02", max_tokens=2,
                                   messages=[{"role": "user", "content": "w5"}])
    post(words, "/tokenize", {"model": "a02", "prompt": "w3"})
    assert len(threads) >= 3 and "uvicorn" not in threads, threads
    codec = word_codec(str(tmp_path))          # the batch call gives what the plain one does
    for text in ["w1 w2 w3", "w7 zz w9", "<s> w4"]:
        assert codec.encode(text) == codec.tokenizer.encode(text, add_special_tokens=True).ids


def test_base_model_name_selects_no_adapter(srv):
    base = complete(srv["url"], BASE, [9, 8, 7], 8)["choices"][0]["text"]
    assert ids_of(base) == dense_greedy(params(), MC, [9, 8, 7], 8)[0]


def test_chat_template_from_tokenizer_config(srv):
    url = srv["words"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]
    out = client.chat.completions.create(model="a02", messages=msgs, max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    # "<s> system w1 w2 <s> user w3 w4 w5 assistant" is 10 tokens.
    assert out.usage.prompt_tokens == 10 and out.usage.completion_tokens == 6
    words = out.choices[0].message.content.split()
    assert 1 <= len(words) <= 6 and all(w in {"user", "assistant", "system", "[UNK]"}
                                        or w.startswith("w") for w in words)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a02", messages=msgs, max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == out.choices[0].message.content
    text = client.completions.create(model="a02", prompt="w3 w4", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text.usage.prompt_tokens == 2


def test_stop_strings_cut_the_text(srv):
    url = srv["url"]
    full = complete(url, "a06", [2, 7, 1, 8], 10)["choices"][0]["text"]
    toks = full.split()
    stop = " " + toks[3]
    cut = full[:full.find(stop)]
    for stream, n in [(False, 1), (True, 1), (False, 2), (True, 2)]:
        r = post(url, "/v1/completions", {"model": "a06", "prompt": [2, 7, 1, 8], "max_tokens": 10,
                                          "temperature": 0, "stop": [stop], "stream": stream,
                                          "n": n})
        if stream:
            chunks = [json.loads(x[6:]) for x in r.text.splitlines()
                      if x.startswith("data: {")]
            text, finish = {}, {}
            for ch in (c for chunk in chunks for c in chunk["choices"]):
                text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
                finish[ch["index"]] = ch["finish_reason"] or finish.get(ch["index"])
        else:
            text = {c["index"]: c["text"] for c in r.json()["choices"]}
            finish = {c["index"]: c["finish_reason"] for c in r.json()["choices"]}
        assert text == dict.fromkeys(range(n), cut) and finish == dict.fromkeys(range(n), "stop")
    assert wait_idle(srv["eng"])["pages"]["kv"] == 0


def test_logprobs(srv):
    out = complete(srv["url"], "a01", [5, 6], 4, logprobs=1)["choices"][0]
    lp = out["logprobs"]
    assert lp["tokens"] == out["text"].split() and len(lp["token_logprobs"]) == 4
    assert all(x <= 0 for x in lp["token_logprobs"])
    r = post(srv["url"], "/v1/chat/completions", {"model": "a01", "max_tokens": 4, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "5 6"}],
                                                  "logprobs": True, "top_logprobs": 1})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_seeded_sampling_is_reproducible(srv):
    body = dict(temperature=1.0, top_p=0.9, top_k=20, seed=11)
    a = complete(srv["url"], "a03", [1, 2], 8, **body)["choices"][0]["text"]
    b = complete(srv["url"], "a03", [1, 2], 8, **body)["choices"][0]["text"]
    assert a == b


def test_models_health_metrics(srv):
    url = srv["url"]
    still_serving(url)          # an adapter loaded into the pool, whatever ran before
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert models[0]["id"] == BASE and models[0]["parent"] is None
    assert {m["id"] for m in models[1:]} >= set(srv["adapters"])
    assert all(m["parent"] == BASE for m in models[1:])
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics").text
    for series in ['slora_adapters{tier="registered"}', 'slora_pool_pages{kind="kv"}',
                   "slora_queue_length", "slora_running_requests",
                   'slora_adapter_load_seconds_count{tier="pool"}',
                   "slora_time_to_first_token_seconds_count",
                   "slora_time_per_output_token_seconds_count"]:
        assert series in text, series


def test_model_retrieve_tokenize_and_detokenize(srv):
    client = openai.OpenAI(base_url=f"{srv['url']}/v1", api_key="none", max_retries=0)
    base = client.models.retrieve(BASE)
    assert base.id == BASE and base.model_extra["max_model_len"] == 48
    assert client.models.retrieve("a03").model_extra["parent"] == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    url, words = srv["url"], srv["words"]
    r = post(url, "/tokenize", {"model": "a01", "prompt": "5 6 7"}).json()
    assert r == {"count": 3, "max_model_len": 48, "tokens": [5, 6, 7]}
    assert post(url, "/detokenize", {"model": BASE, "tokens": [5, 6, 7]}).json() == {
        "prompt": "5 6 7"}
    # with a tokenizer: the same ids the completion endpoints count, and back to the text
    t = post(words, "/tokenize", {"model": "a02", "prompt": "w3 w4 w5"}).json()
    assert t["count"] == 3
    assert post(words, "/detokenize", {"model": "a02", "tokens": t["tokens"]}).json() == {
        "prompt": "w3 w4 w5"}
    msgs = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]
    assert post(words, "/tokenize", {"model": "a02", "messages": msgs}).json()["count"] == 10
    for path, body, status, param in [
            ("/tokenize", {"model": "nope", "prompt": "1"}, 404, "model"),
            ("/tokenize", {"model": BASE, "prompt": "hello"}, 400, "prompt"),
            ("/tokenize", {"model": BASE}, 400, "prompt"),
            ("/tokenize", {"model": BASE, "prompt": "1", "messages": msgs}, 400, "prompt"),
            ("/detokenize", {"model": BASE, "tokens": [1, 9999]}, 400, "tokens"),
            ("/detokenize", {"model": BASE, "tokens": [-1]}, 400, "tokens"),
            ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model")]:
        r = post(url, path, body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    still_serving(url)


def test_api_key_guards_the_api_routes_only(srv, monkeypatch):
    from serving.bootstrap import build_parser
    from serving.server import api_key
    key = f"k-{random.getrandbits(64):x}"
    guarded = ServerThread(create_app(srv["eng"], TextCodec(), BASE, api_key=key)).start()
    try:
        url = guarded.url
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key=key + "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            wrong.completions.create(model="a01", prompt=[1, 2], max_tokens=2)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        out = right.completions.create(model="a01", prompt=[1, 2], max_tokens=3, temperature=0)
        assert out.choices[0].text == complete(srv["url"], "a01", [1, 2], 3)["choices"][0]["text"]
        for method, path in [("GET", "/v1/models"), ("POST", "/tokenize"),
                             ("POST", "/v1/chat/completions")]:
            r = httpx.request(method, f"{url}{path}", json={"model": BASE, "prompt": "1"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").status_code == 200           # probes stay open
        assert httpx.get(f"{url}/metrics").status_code == 200
    finally:
        guarded.stop()
    args = build_parser().parse_args(["--dummy", "tiny"])
    monkeypatch.delenv("SLORA_API_KEY", raising=False)
    assert api_key(args) is None
    monkeypatch.setenv("SLORA_API_KEY", "from-env")
    assert api_key(args) == "from-env"
    assert api_key(build_parser().parse_args(["--dummy", "tiny", "--api-key", "flag"])) == "flag"


# --- errors: each one a proper status, and the server keeps serving ------------------------

@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"model": "nope", "prompt": [1]}, 404, "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "1"}]},
     404, "model"),
    ("/v1/completions", {"model": "a00", "prompt": [1] * 65}, 400, "prompt"),
    ("/v1/completions", {"model": "a00", "prompt": [1] * 40, "max_tokens": 9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a00", "prompt": [1, 9999]}, 400, "prompt"),
    ("/v1/completions", {"model": "a00", "prompt": "hello world"}, 400, "prompt"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "max_tokens": "lots"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a00"}, 400, "prompt"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "n": 65}, 400, "n"),
    ("/v1/completions", {"model": "a00", "prompt": [[1]] * 65, "n": 4}, 400, "prompt"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/chat/completions", {"model": "a00", "messages": [{"role": "user", "content": "1"}],
                              "stop": "y" * 1025}, 400, "stop"),
    ("/v1/chat/completions", {"model": "a00", "messages": [{"role": "user", "content": "1"}],
                              "logprobs": True, "top_logprobs": 5}, 400, "top_logprobs"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "n": 3, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "best_of": 2, "stream": True}, 400,
     "best_of"),
    ("/v1/chat/completions", {"model": "a00", "messages": [{"role": "user", "content": "1"}],
                              "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "a00", "prompt": [1], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "a00", "messages": []}, 400, "messages"),
    ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name"),
])
def test_bad_requests_get_openai_errors(srv, path, body, status, param):
    r = post(srv["url"], path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    still_serving(srv["url"])


def test_malformed_json_and_unknown_routes(srv):
    url = srv["url"]
    r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    still_serving(url)


def test_openai_client_sees_typed_errors(srv):
    client = openai.OpenAI(base_url=f"{srv['url']}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=[1], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 47"):     # max_context 48
        client.completions.create(model="a00", prompt=[1] * 65, max_tokens=2)
    with pytest.raises(openai.NotFoundError):   # a stream fails before it starts
        list(client.completions.create(model="nope", prompt=[1], max_tokens=2, stream=True))
    still_serving(srv["url"])


def test_overload_gets_429_and_the_server_recovers(srv):
    eng = make_engine(srv["root"], sched={"max_queue": 2})     # same shapes: no compile
    server = ServerThread(create_app(eng, TextCodec(), BASE)).start()
    body = {"model": "a00", "prompt": [1, 2, 3], "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}

    async def fire():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json=body)
                                          for _ in range(40)))
    try:
        codes = [r.status_code for r in asyncio.run(fire())]
        assert set(codes) == {200, 429}, codes        # the rest were served
        r429 = next(r for r in asyncio.run(fire()) if r.status_code == 429)
        assert r429.json()["error"]["type"] == "server_overloaded"
        assert r429.headers["retry-after"] == "1"
        still_serving(server.url)
    finally:
        server.stop()
        eng.shutdown()


def test_first_token_slo_abort_is_a_503_streamed_or_not(srv):
    eng = make_engine(srv["root"], sched={"ttft_slo_s": 0.0})   # every request is already late
    server = ServerThread(create_app(eng, TextCodec(), BASE)).start()
    try:
        for stream in (False, True):
            r = post(server.url, "/v1/completions", {"model": "a00", "prompt": [1, 2],
                                                     "max_tokens": 3, "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "slo_abort", r.text
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
        eng.shutdown()


# --- adapters at run time -------------------------------------------------------------------

def test_load_and_unload_lora_adapter(srv, tmp_path):
    url, root = srv["url"], srv["root"]
    save_peft_adapter(srv["adapters"]["a11"], os.path.join(root, "new"))
    save_peft_adapter(srv["adapters"]["a11"], str(tmp_path / "outside"))
    os.symlink(tmp_path / "outside", os.path.join(root, "escape"))
    for bad in [str(tmp_path / "outside"), os.path.join(root, "..", "x"),
                os.path.join(root, "escape")]:
        r = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": bad})
        assert r.status_code == 403, r.text
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path":
                                            os.path.join(root, "new")})
    assert r.status_code == 200 and "fresh" in r.text
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path":
                                            os.path.join(root, "new")})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"]
    assert "fresh" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert (complete(url, "fresh", [3, 3], 5)["choices"][0]["text"]
            == complete(url, "a11", [3, 3], 5)["choices"][0]["text"])
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 200
    assert post(url, "/v1/completions", {"model": "fresh", "prompt": [1]}).status_code == 404
    still_serving(url)


def test_serve_load_benchmark_against_the_server(srv, tmp_path):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve_load.py")
    spec = importlib.util.spec_from_file_location("serve_load", path)
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.modules["serve_load"] = mod        # dataclasses look their module up there
    spec.loader.exec_module(mod)
    # Two client processes share the trace (request i to process i % 2).
    rc = mod.main(["--url", srv["url"], "--num-requests", "12", "--rate", "50", "--clients", "2",
                   "--input-range", "2,10", "--output-range", "2,8", "--out-dir", str(tmp_path)])
    assert rc == 0
    (out,) = tmp_path.iterdir()
    rec = json.loads(out.read_text())
    assert rec["summary"]["completed"] == 12 and rec["git"] and rec["jax"]
    assert rec["summary"]["slo_attainment"] == 1.0
    assert rec["server_counters"]["slora_prompt_tokens_total"] >= 12 * 2

    # --sweep: rising rates until the SLO attainment falls below 90%, rows merged by commit.
    sweep = tmp_path / "sweep"
    common = ["--url", srv["url"], "--input-range", "2,10", "--output-range", "2,8",
              "--duration", "0.2", "--ranks-label", "1-16", "--out-dir", str(sweep)]
    assert mod.main([*common, "--sweep", "20,40"]) == 0
    (path,) = sweep.iterdir()
    rows = json.loads(path.read_text())["rows"]
    assert [r["offered_req_s"] for r in rows] == [20.0, 40.0]
    assert all(r["system"] == "slora-jax" and r["ranks"] == "1-16" and r["adapters"] == 16
               and r["slo_attainment"] == 1.0 and r["served_req_s"] > 0 and r["tpot_ms"] > 0
               and r["completed_req_s"] > 0 for r in rows)
    # Each point carries the server's counters over its window: the steps it ran, and the
    # engine thread's time by section.
    for r in rows:
        steps = sum(v for k, v in r["server"].items() if k.startswith("slora_steps_total"))
        assert steps >= 1 and r["server"]["slora_generation_tokens_total"] >= r["requests"]
        assert any(k.startswith("slora_engine_thread_seconds") for k in r["server"])
    # An SLO nobody meets stops the sweep at its first rate; that row replaces the old one.
    assert mod.main([*common, "--sweep", "20,40,80", "--slo-ttft", "1e-6"]) == 0
    rec = json.loads(path.read_text())
    assert [(r["offered_req_s"], r["slo_attainment"]) for r in rec["rows"]] == [(20.0, 0.0),
                                                                                (40.0, 1.0)]
    assert {"device", "commit", "command", "workload", "served"} <= set(rec)

    # --sweep-adapters: the base model alone, then 4 adapters starting at the rate the base
    # sustained; the rows join the file's, whose command lists every run.
    assert mod.main([*common, "--sweep", "20,40", "--sweep-adapters", "0,4"]) == 0
    rec = json.loads(path.read_text())
    assert [(r["adapters"], r["offered_req_s"]) for r in rec["rows"]] == [
        (0, 20.0), (0, 40.0), (4, 40.0), (16, 20.0), (16, 40.0)]
    assert rec["command"].count("serve_load.py") == 3 and "--sweep-adapters 0,4" in rec["command"]
    assert all(r["ranks"] == "-" for r in rec["rows"] if r["adapters"] == 0)
    # A spent budget starts no further point; a count above the server's is an error.
    assert mod.main([*common, "--sweep", "20,40", "--sweep-adapters", "1", "--sweep-budget",
                     "1e-9"]) == 0
    assert not [r for r in json.loads(path.read_text())["rows"] if r["adapters"] == 1]
    with pytest.raises(SystemExit, match="lists 16 adapters"):
        mod.main([*common, "--sweep", "20", "--sweep-adapters", "17"])
