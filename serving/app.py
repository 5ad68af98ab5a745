"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of one `Engine`.

    POST /v1/completions, /v1/chat/completions   (SSE streaming with "stream": true)
    GET  /v1/models                                base model + every registered adapter
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}   (vLLM's shape)
    POST /v1/unload_lora_adapter {"lora_name"}
    GET  /v1/models/{model}; POST /tokenize, /detokenize (vLLM's shapes)
    GET  /health, /metrics (Prometheus)

`model` names the adapter; the base model's name selects none. Errors have
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: unknown
adapter 404, malformed body 400, prompt too long 400, lora_path outside the
adapter roots 403, queue full 429, first-token SLO cannot be met or engine
down 503. A streamed request waits for its first token before the response
starts, so those errors keep their status code; a client that disconnects
cancels its request and its pages return to the pool at once.

`python -m serving.server ...` runs it (serving/server.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.adapter_store import AdapterPathNotAllowed
from serving.middleware import MAX_BODY_BYTES, JSON, ApiKey, BodyLimit, sse
from serving.middleware import error_response as _error
from serving.choices import Choice, best_of, merged
from serving.engine import Engine
from serving.metrics import CONTENT_TYPE_LATEST
from serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                              LoadLoraRequest, TextCodec, TextError, TokenizeRequest,
                              UnloadLoraRequest,
                              chat_logprobs, chat_response, completion_logprobs,
                              completion_response, error_body, new_id, usage)
from serving.requests import (GenerationRequest, InvalidRequest, RequestError,
                              UnknownAdapter, sample_seed)
from slora_jax.adapters import AdapterError
from slora_jax.batching import Sampling

log = logging.getLogger("serving.server")


def _request_error(e: RequestError) -> JSON:
    r = _error(e.status, e.message, e.type, e.param, e.code)
    if e.status in (429, 503):
        r.headers["Retry-After"] = "1"
    return r


async def disconnected(request: Request, poll_s: float = 0.1) -> None:
    """Returns once the client has gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)


def create_app(engine: Engine, codec: TextCodec, model_name: str, *,
               default_max_tokens: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) under `model_name`.

    `engine` is an `Engine` in this process or an `EngineClient` of one in another: the
    app uses `info`, `alive`, `generate`, `cancel`, `adapter_names`, `load_adapter`,
    `unload_adapter` and `metrics_text`."""
    app = FastAPI(title="slora-jax", version="0.1.0", default_response_class=JSON)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)          # outermost: before the body is read
    app.state.engine = engine
    eos_ids = set(engine.info.eos_token_ids) | codec.eos_token_ids()
    created = int(time.time())

    # -- errors ---------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _on_request_error(request: Request, e: RequestError):
        return _request_error(e)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return _error(400, "the request body is not valid JSON", "invalid_request_error",
                          code="json_invalid")
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body')}: "
                        f"{err.get('msg')}" for err in errs[:5])
        return _error(400, f"invalid request: {msg}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _on_any(request: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", "server_error")

    # -- helpers ----------------------------------------------------------------------
    def adapter_of(model: str) -> str | None:
        return None if model == model_name else model

    def gen_request(body, prompt: list[int], max_tokens: int | None,
                    sample: int = 0) -> GenerationRequest:
        limit = engine.info.max_context - len(prompt)
        if max_tokens is None:
            max_tokens = max(1, min(limit, default_max_tokens or limit))
        stop_ids = frozenset(body.stop_token_ids or ()) | (frozenset() if body.ignore_eos
                                                            else frozenset(eos_ids))
        seed = (sample_seed(body.seed, sample) if body.seed is not None
                else random.getrandbits(31))
        return GenerationRequest(
            prompt=prompt, adapter=adapter_of(body.model), max_tokens=max_tokens,
            sampling=Sampling(temperature=body.temperature, top_p=body.top_p,
                              top_k=max(0, body.top_k), seed=seed),
            stop_token_ids=stop_ids, ttft_slo_s=body.ttft_slo_s)

    def check(body) -> None:
        bad = body.unsupported()
        if bad:
            raise InvalidRequest(f"'{bad[0]}': {bad[1]}", bad[0])

    def submit(body, prompts: list[list[int]], max_tokens: int | None,
               stops: list[str]) -> list[Choice]:
        """body.samples() requests per prompt, prompt by prompt; the choice of prompt i's
        j-th sample has index i * samples + j."""
        k = body.samples()
        choices: list[Choice] = []
        try:
            for i, p in enumerate(prompts):
                for j in range(k):
                    choices.append(Choice(i * k + j, engine.generate(
                        gen_request(body, p, max_tokens, j)), codec, stops))
        except RequestError:
            for c in choices:
                c.stream.cancel()
            raise
        return choices

    async def collect(choices: list[Choice], request: Request) -> None:
        async def run():
            async for c, out in merged(choices):
                c.take(out)

        work, watcher = asyncio.create_task(run()), asyncio.create_task(disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
            else:
                work.cancel()
        finally:
            watcher.cancel()
            for c in choices:
                if c.finish is None:
                    c.stream.cancel()

    async def stream_response(choices: list[Choice], frame, tail, request: Request) -> Response:
        """SSE: wait for the first output (errors keep their status), then stream. A client
        that leaves before its first token cancels the request before its prefill."""
        events = merged(choices)
        head = asyncio.ensure_future(events.__anext__())
        watcher = asyncio.create_task(disconnected(request))
        try:
            await asyncio.wait({head, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not head.done():
            head.cancel()
            for c in choices:
                c.stream.cancel()
            return Response(status_code=499)        # nobody reads it: the client is gone
        try:
            first = head.result()
        except StopAsyncIteration:
            first = None

        async def body():
            try:
                if first is not None:
                    yield frame(*first)
                try:
                    async for c, out in events:
                        yield frame(c, out)
                except RequestError as e:
                    yield sse(error_body(e.message, e.type, e.param, e.code))
                for extra in tail():
                    yield extra
                yield b"data: [DONE]\n\n"
            finally:
                await events.aclose()
                for c in choices:
                    if c.finish is None:
                        c.stream.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # -- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the engine is not running", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(await engine.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "slora-jax",
                "root": name, "parent": None if name == model_name else model_name}
        if name == model_name:
            card |= {"max_model_len": engine.info.max_context,
                     "vocab_size": engine.info.vocab_size}
        return card

    async def known(name: str) -> str:
        if name != model_name and name not in await engine.adapter_names():
            raise UnknownAdapter(f"The model `{name}` does not exist.", "model")
        return name

    @app.get("/v1/models")
    async def models():
        names = [model_name] + list(await engine.adapter_names())
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return model_card(await known(name))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        await known(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("give either 'prompt' or 'messages'", "prompt")
        try:
            if body.messages is None:
                ids = await asyncio.to_thread(codec.encode, body.prompt)
            else:
                ids = await asyncio.to_thread(codec.render_chat, body.messages,
                                              body.add_generation_prompt)
        except TextError as e:
            raise InvalidRequest(str(e), "prompt" if body.messages is None else "messages") \
                from None
        return {"count": len(ids), "max_model_len": engine.info.max_context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        await known(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.info.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary "
                                 f"[0, {engine.info.vocab_size})", "tokens")
        return {"prompt": await asyncio.to_thread(codec.decode, body.tokens, True)}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest):
        if body.lora_name == model_name:
            raise InvalidRequest(f"'{body.lora_name}' is the base model's name", "lora_name")
        try:
            await engine.load_adapter(body.lora_name, body.lora_path)
        except AdapterPathNotAllowed as e:
            return _error(403, str(e), "permission_error", "lora_path")
        except (AdapterError, OSError) as e:
            return _error(400, str(e), "invalid_request_error", "lora_path")
        log.info("loaded LoRA adapter %r from %r", body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest):
        try:
            await engine.unload_adapter(body.lora_name)
        except KeyError:
            return _error(404, f"The LoRA adapter `{body.lora_name}` does not exist.",
                          "invalid_request_error", "lora_name", "model_not_found")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        try:
            # off the event loop: a long prompt must not stall the other requests' streams
            prompts = await asyncio.to_thread(lambda: [codec.encode(p) for p in body.prompts()])
        except TextError as e:
            raise InvalidRequest(str(e), "prompt") from None
        if body.stream and len(prompts) > 1:
            raise InvalidRequest("streaming supports one prompt per request", "prompt")
        choices = submit(body, prompts, body.max_tokens, body.stops())
        rid, top = new_id("cmpl"), body.logprobs
        k = body.samples()
        echo = [codec.echo(p) for p in body.prompts()] if body.echo else None
        echoed: set[int] = set()

        def piece(c: Choice, delta, ids, lps):
            lp = completion_logprobs(codec, ids, lps, top) if top is not None else None
            if echo and c.index not in echoed:          # the prompt before the first delta
                echoed.add(c.index)
                delta = echo[c.index // k] + delta
            return {"index": c.index, "text": delta, "logprobs": lp, "finish_reason": c.finish}

        if body.stream:
            def frame(c, out):
                return sse(completion_response(rid, body.model, [piece(c, *c.take(out))], {},
                                               chunk=True))

            def tail():
                if body.include_usage():
                    d = completion_response(rid, body.model, [], {}, chunk=True)
                    d["usage"] = usage(choices[0].n_prompt, sum(len(c.ids) for c in choices))
                    yield sse(d)
            return await stream_response(choices, frame, tail, request)

        await collect(choices, request)
        out = [{"index": i, "text": (echo[c.index // k] if echo else "") + c.text.text,
                "logprobs": completion_logprobs(codec, c.ids, c.lps, top) if top is not None
                else None, "finish_reason": c.finish}
               for i, c in best_of(choices, body.samples(), body.n)]
        # every sample counts, those best_of left out too
        return completion_response(rid, body.model, out, usage(
            sum(len(p) for p in prompts), sum(len(c.ids) for c in choices)))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check(body)
        try:
            prompt = await asyncio.to_thread(codec.render_chat, body.messages,
                                             body.add_generation_prompt)
        except TextError as e:
            raise InvalidRequest(str(e), "messages") from None
        choices = submit(body, [prompt], body.limit(), body.stops())
        rid, want_lp = new_id("chatcmpl"), body.logprobs
        top = body.top_logprobs or 0

        if body.stream:
            started: set[int] = set()

            def frame(c, out):
                delta, ids, lps = c.take(out)
                d = {} if c.index in started else {"role": "assistant"}
                started.add(c.index)
                if delta or "role" in d:
                    d["content"] = delta
                ch = {"index": c.index, "delta": d, "finish_reason": c.finish,
                      "logprobs": chat_logprobs(codec, ids, lps, top) if want_lp else None}
                return sse(chat_response(rid, body.model, [ch], None, True))

            def tail():
                if body.include_usage():
                    yield sse(chat_response(rid, body.model, [], usage(
                        choices[0].n_prompt, sum(len(c.ids) for c in choices)), True))
            return await stream_response(choices, frame, tail, request)

        await collect(choices, request)
        chs = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                "logprobs": chat_logprobs(codec, c.ids, c.lps, top) if want_lp else None,
                "finish_reason": c.finish} for c in choices]
        return chat_response(rid, body.model, chs, usage(len(prompt),
                                                         sum(len(c.ids) for c in choices)))

    return app


class ServerThread:
    """uvicorn serving `app` from a background thread, on a socket bound before it starts."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock

