"""The engine in its own process, through the real command line: `python -m serving.server`
starts an HTTP server process that spawns the engine process; clients are httpx and openai.

One server (the tiny GQA HF + PEFT fixture, float32, three compiled shapes) answers the
API tests. Four more, started once the first has filled the compile cache, are stopped
each their own way: the engine killed (503 within a second, the server exits non-zero),
Ctrl-C to the server's process group, the server killed outright (the engine follows it),
and SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures", "tiny_gqa")
ADAPTERS = os.path.join(FIX, "adapters")
N_TOKENS = 16
# One bucket per kind and one adapter-copy size: three compiled shapes per start.
YAML = """engine: {page_size: 4, num_pages: 256, max_rank: 16, max_batch: 4, max_prefill_tokens: 32,
         max_prefill_requests: 2, max_context: 256, decode_buckets: [4],
         prefill_token_buckets: [32]}
scheduler: {base_only_steps: false}
store: {load_chunk_pages: 1}
server: {dtype: float32}
"""

pytestmark = pytest.mark.skipif(not os.path.isdir(ADAPTERS),
                                reason="HF/PEFT oracle fixtures not generated")


class Server:
    """`python -m serving.server` in a session of its own, its log collected line by line."""

    def __init__(self, tmp):
        cmd = [sys.executable, "-m", "serving.server", "--model", os.path.join(FIX, "model"),
               "--adapters", ADAPTERS, "--config", str(tmp / "s.yaml"), "--port", "0",
               "--compile-cache", str(tmp / "jax-cache")]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.lines: list[str] = []
        self.url = self.engine_pid = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"engine process (\d+) is ready", line)
            if m:
                self.engine_pid = int(m.group(1))
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def log(self) -> str:
        return "".join(self.lines[-30:])

    def wait_ready(self, timeout=240.0) -> "Server":
        assert self._ready.wait(timeout) and self.url, self.log()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log()
            time.sleep(0.05)

    def children(self) -> list[int]:
        """The server's child processes (the engine, multiprocessing's resource tracker)."""
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(d))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    (tmp / "s.yaml").write_text(YAML)
    main = Server(tmp).wait_ready()
    # The same model and buckets: these start from the compile cache main has just filled,
    # while the API tests run.
    spares = {k: Server(tmp) for k in ("kill_engine", "sigint", "kill_server", "sigterm")}
    yield {"main": main, **spares}
    for s in (main, *spares.values()):
        s.stop()


@pytest.fixture(scope="module")
def url(servers):
    return servers["main"].url


def post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kw)


def ids_of(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def kv_pages(url) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r'^slora_pool_pages\{kind="kv"\} (\S+)$', text, re.M).group(1))


def finished_counts(url) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {k: float(v) for k, v in
            re.findall(r'^slora_requests_finished_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


# --- the messages -------------------------------------------------------------------------------

def test_errors_cross_as_the_same_class_and_status():
    from serving import ipc
    from serving.adapter_store import AdapterPathNotAllowed
    from serving.engine import Output
    from serving.requests import (AdapterLoadFailed, InvalidRequest, Overloaded, SloAbort,
                                  Unavailable, UnknownAdapter)
    from slora_jax.adapters import AdapterError
    errors = [InvalidRequest("too long", "prompt"), UnknownAdapter("no such model", "model"),
              Overloaded("queue full"), Unavailable("down"), SloAbort("late"),
              AdapterLoadFailed("bad file"), AdapterPathNotAllowed("outside"),
              AdapterError("no config"), KeyError("name"), FileNotFoundError("gone")]
    msg = ipc.Outputs([ipc.out_of(str(i), Output([], [], error=e)) for i, e in enumerate(errors)])
    back = ipc.decode_from_engine(ipc.encode(msg))
    for e, o in zip(errors, back.items):
        r = o.output().error
        want = OSError if isinstance(e, OSError) else type(e)
        assert type(r) is want and str(r) == str(e)
        assert getattr(r, "status", None) == getattr(e, "status", None)
        assert getattr(r, "param", None) == getattr(e, "param", None)


def test_one_flush_is_one_small_message():
    from serving import ipc
    from serving.engine import Output
    items = [ipc.out_of(f"{i:032x}", Output([1000 + i], [-0.5], None, num_prompt_tokens=20))
             for i in range(128)]
    raw = ipc.encode(ipc.Outputs(items))
    assert len(raw) < 128 * 60           # about 52 bytes a request: the id is most of it
    assert ipc.decode_from_engine(raw).items == items


NESTED_SIGTERMS = """
import os, signal, sys, threading
import zmq
from serving.engine_process import Bridge, stop_on_sigterm
ctx = zmq.Context()
inbox, replies, outputs = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
inbox.bind("inproc://in")
bridge = Bridge(None, inbox, replies, outputs, os.getppid())
if sys.argv[1] == "event":                      # the handler stop_on_sigterm replaced
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (stop.wait(), setattr(bridge, "stop_requested", True)),
                     daemon=True).start()
else:
    stop_on_sigterm(bridge)
# Every Python call made while the handler runs gets another SIGTERM, handled before the
# call's next line: signals from other processes can arrive at any point of a handler.
handler, depth, left = signal.getsignal(signal.SIGTERM), [0], [5]

def wrapped(*a):
    depth[0] += 1
    try:
        handler(*a)
    finally:
        depth[0] -= 1

def profile(frame, event, arg):
    if event == "call" and depth[0] and left[0]:
        left[0] -= 1
        os.kill(os.getpid(), signal.SIGTERM)
signal.signal(signal.SIGTERM, wrapped)
sys.setprofile(profile)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
bridge.run()
sys.setprofile(None)
print("stopped", flush=True)
os._exit(0)
"""


def test_sigterms_arriving_inside_the_handler_still_stop_the_engine_bridge():
    """SIGTERM comes from the server and from PR_SET_PDEATHSIG, so a second one can arrive
    while the first is being handled (the server killed while it stops the engine). The
    handler used to set a threading.Event, whose lock the second, handled inside the
    first's Event.set, waited on forever: an orphan engine process. Run with "event", this
    script hangs."""
    out = subprocess.run([sys.executable, "-c", NESTED_SIGTERMS, "flag"], cwd=REPO, timeout=60,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and "stopped" in out.stdout, out.stderr[-2000:]


# --- the API through the split -----------------------------------------------------------------

def test_greedy_tokens_match_the_hf_peft_oracle(url):
    with open(os.path.join(FIX, "requests.json")) as f:
        reqs = json.load(f)
    oracle = np.load(os.path.join(FIX, "oracle.npz"))
    base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

    async def fire():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/completions", json={
                "model": r["adapter"] or base, "prompt": r["prompt_token_ids"],
                "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}) for r in reqs))
    outs = asyncio.run(fire())
    assert {r["adapter"] for r in reqs} > {None}        # with and without adapters
    for r, out in zip(reqs, outs):
        assert out.status_code == 200, out.text
        want = [int(t) for t in oracle[f"{r['id']}/greedy_tokens"][:N_TOKENS]]
        assert ids_of(out.json()["choices"][0]["text"]) == want, (r["id"], r["adapter"])


def test_streaming_frames_and_the_openai_client(url):
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "r8_attn", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [x for x in r.iter_lines() if x]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    full = client.completions.create(model="r8_attn", prompt=[5, 6, 7], max_tokens=5,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].text == streamed and len(ids_of(streamed)) == 5
    parts = list(client.chat.completions.create(
        model="r4_mlp", max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "3 1 4 1 5"}]))
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].usage.completion_tokens == 4


def test_errors_keep_their_status_codes(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):       # decided in the engine process
        client.completions.create(model="nope", prompt=[1, 2], max_tokens=2)
    r = post(url, "/v1/completions", {"model": "nope", "prompt": [1], "stream": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(url, "/v1/completions", {"model": "r2_qv", "prompt": [1] * 256})   # max_context
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "at most 255" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"})
    assert r.status_code == 403
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": ADAPTERS})
    assert r.status_code == 400             # a folder with no adapter_config.json
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert r.status_code == 404
    assert httpx.get(f"{url}/health").status_code == 200


def test_load_and_unload_an_adapter(url):
    def complete(model):
        r = post(url, "/v1/completions", {"model": model, "prompt": [9, 8, 7], "max_tokens": 6,
                                          "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "again",
                                            "lora_path": os.path.join(ADAPTERS, "r2_qv")})
    assert r.status_code == 200, r.text
    assert "again" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    status, out = complete("again")
    assert status == 200 and out["choices"][0]["text"] == complete("r2_qv")[1]["choices"][0]["text"]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "again"}).status_code == 200
    assert complete("again")[0] == 404
    assert "again" not in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_a_client_leaving_mid_stream_frees_its_pages(servers):
    url, engine_pid = servers["main"].url, servers["main"].engine_pid
    deadline = time.monotonic() + 10
    while kv_pages(url):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    finished = finished_counts(url)
    body = {"model": "r16_rslora_all", "prompt": [4, 5, 6], "max_tokens": 250, "temperature": 0,
            "stream": True, "ignore_eos": True}
    # The engine does not wait for readers: on a loaded machine it could reach the 250th
    # token before this client has read its first. So it runs in 3 ms slices (SIGSTOP and
    # SIGCONT) until the first token is read, and stays paused until the server has had
    # time to see the client go and forward the abort; the request then ends as an abort,
    # not by length, and its pages are back.
    first, leave = threading.Event(), threading.Event()

    def client():
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                assert next(r.iter_lines()).startswith("data: ")
                first.set()
                leave.wait(60)
    reader = threading.Thread(target=client, daemon=True)
    try:
        os.kill(engine_pid, signal.SIGSTOP)
        reader.start()
        deadline = time.monotonic() + 60
        while not first.is_set():
            assert time.monotonic() < deadline and reader.is_alive(), "no first token"
            os.kill(engine_pid, signal.SIGCONT)
            time.sleep(0.003)
            os.kill(engine_pid, signal.SIGSTOP)
            first.wait(0.05)
        leave.set()
        reader.join(10)
        time.sleep(2.0)
    finally:
        leave.set()
        os.kill(engine_pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while kv_pages(url) or finished_counts(url) == finished:
        assert time.monotonic() < deadline, "the request did not end"
        time.sleep(0.02)
    after = finished_counts(url)
    assert after.get("abort", 0) == finished.get("abort", 0) + 1
    assert after.get("length", 0) == finished.get("length", 0)


# --- how it ends --------------------------------------------------------------------------------

def test_a_dead_engine_fails_requests_in_flight_with_503_and_the_server_exits(servers):
    srv = servers["kill_engine"].wait_ready()
    url, pid = srv.url, srv.engine_pid
    assert pid in srv.children()
    # 13 requests of 200 tokens, 4 at a time, sent to a paused engine (on a loaded machine
    # the tiny model could otherwise finish some before the last is sent): the server takes
    # them and forwards them, then the engine is killed with all 13 in flight.
    body = {"model": "r8_attn", "prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    killed_at: list[float] = []

    async def one(c):
        r = await c.post(f"{url}/v1/completions", json=body)
        return r.status_code, r.json()["error"]["type"] if r.status_code != 200 else None, \
            time.monotonic()

    async def streamed(c):
        async with c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:                     # killed before its first token
                await r.aread()
                return r.status_code, r.json()["error"]["type"], time.monotonic()
            async for line in r.aiter_lines():
                if "service_unavailable" in line:          # killed mid-stream: an SSE error
                    return 503, "service_unavailable", time.monotonic()
        return 200, None, time.monotonic()

    async def kill_when_all_sent():
        await asyncio.sleep(1.5)
        os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    async def fire():
        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.create_task(streamed(c))] + [asyncio.create_task(one(c))
                                                          for _ in range(12)]
            await kill_when_all_sent()
            return await asyncio.gather(*tasks)
    os.kill(pid, signal.SIGSTOP)
    outs = asyncio.run(fire())
    for status, kind, t in outs:
        assert (status, kind) == (503, "service_unavailable")
        assert t - killed_at[0] < 1.0
    assert httpx.get(f"{url}/health", timeout=2).status_code == 503    # then it exits
    r = post(url, "/v1/completions", body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert srv.proc.wait(15) != 0, srv.log()
    assert wait_gone(srv.children() + [pid])


def test_ctrl_c_stops_both_processes(servers):
    srv = servers["sigint"].wait_ready()
    kids = srv.children()
    assert srv.engine_pid in kids
    os.killpg(srv.proc.pid, signal.SIGINT)              # what a terminal's Ctrl-C does
    assert srv.proc.wait(30) == 0, srv.log()
    assert wait_gone(kids), [p for p in kids if not gone(p)]


def test_a_killed_server_takes_its_engine_with_it(servers):
    srv = servers["kill_server"].wait_ready()
    pid = srv.engine_pid
    srv.proc.kill()
    srv.proc.wait(10)
    assert wait_gone([pid]), "the engine process outlived its server"


def test_sigterm_stops_both_processes(servers):
    """On a server of its own: the workers may run this module's tests in any order."""
    srv = servers["sigterm"].wait_ready()
    kids = srv.children()
    assert srv.engine_pid in kids
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log()
    assert wait_gone(kids), [p for p in kids if not gone(p)]
    assert any("stopped by SIGTERM" in x for x in srv.lines)
