"""The messages between the HTTP server process and the engine process, and their codec.

Data flow (serving/client.py is the server's side, serving/engine_process.py the engine's):

    server process                                   engine process
    EngineClient --- Submit, Cancel, Call, Shutdown --> bridge (input thread) -> Engine
    EngineClient <-- Outputs (one per engine flush) --- engine thread (ProcessChannel)
                 <-- Ready, Failed, Reply ------------- bridge (main thread, RPC workers)

Every message is a msgspec Struct tagged with its class name, encoded with msgpack, one
zmq frame each. `Outputs` carries every request's new tokens, logprobs, finish reasons and
errors of one engine-loop iteration, so the engine thread pays one encode and one send per
step, not one per token per stream. Errors cross as (class name, message, param) and are
rebuilt as the same class on the other side, so the server maps them to the same status.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from serving.adapter_store import AdapterPathNotAllowed
from serving.engine import Output
from serving.requests import EngineInfo, GenerationRequest, RequestError
from slora_jax.adapters import AdapterError
from slora_jax.batching import Sampling

# --- errors ---------------------------------------------------------------------------------

# What may cross, by name: the request errors (their HTTP status is a class attribute), the
# adapter-loading errors the server maps to 403/400, and KeyError (unload: unknown name, 404).
# Anything else crosses as a RuntimeError (the server's catch-all 500).
_OTHER_ERRORS = (AdapterPathNotAllowed, AdapterError, KeyError, OSError, RuntimeError)


def _request_errors(cls=RequestError) -> dict[str, type[RequestError]]:
    """RequestError and its subclasses by name, looked up when needed so that a subclass
    added later crosses with its own status."""
    out = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        out.update(_request_errors(sub))
    return out


class Error(msgspec.Struct, array_like=True):
    kind: str                      # the class name: a RequestError or one of _OTHER_ERRORS
    message: str
    param: str | None = None


def error_of(e: BaseException) -> Error:
    if isinstance(e, RequestError):
        return Error(type(e).__name__, e.message, e.param)
    for cls in _OTHER_ERRORS[:-1]:
        if isinstance(e, cls):
            # KeyError's str() quotes its argument; its first argument is the name itself.
            msg = str(e.args[0]) if cls is KeyError and e.args else str(e)
            return Error(cls.__name__, msg)
    return Error("RuntimeError", f"{type(e).__name__}: {e}")


def rebuild(err: Error) -> BaseException:
    req = _request_errors().get(err.kind)
    if req is not None:
        return req(err.message, err.param)
    cls = {c.__name__: c for c in _OTHER_ERRORS}.get(err.kind, RuntimeError)
    return cls(err.message)


# --- server -> engine -------------------------------------------------------------------------

class Submit(msgspec.Struct, tag=True, array_like=True):
    id: str
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: list[int]
    ttft_slo_s: float | None

    @classmethod
    def of(cls, r: GenerationRequest) -> "Submit":
        s = r.sampling
        return cls(r.id, r.prompt, r.adapter, r.max_tokens, s.temperature, s.top_p, s.top_k,
                   s.seed, sorted(r.stop_token_ids), r.ttft_slo_s)

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt, adapter=self.adapter, max_tokens=self.max_tokens,
            sampling=Sampling(self.temperature, self.top_p, self.top_k, self.seed),
            stop_token_ids=frozenset(self.stop_token_ids), ttft_slo_s=self.ttft_slo_s,
            id=self.id)


class Cancel(msgspec.Struct, tag=True, array_like=True):
    id: str


# The engine methods a `Call` may name (serving/engine_process.py runs them on the Engine).
Method = Literal["adapter_names", "load_adapter", "unload_adapter", "metrics_text",
                 "evict_idle_adapters", "stats"]


class Call(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    method: Method
    args: list[Any] = []


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


ToEngine = Union[Submit, Cancel, Call, Shutdown]


# --- engine -> server -------------------------------------------------------------------------

class Out(msgspec.Struct, array_like=True):
    """One request's part of a flush: `serving.engine.Output` plus the request id."""
    id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    error: Error | None = None

    def output(self) -> Output:
        return Output(self.token_ids, self.logprobs, self.finish_reason,
                      None if self.error is None else rebuild(self.error),
                      self.num_prompt_tokens)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Outputs(msgspec.Struct, tag=True, array_like=True):
    items: list[Out]


class Reply(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    value: Any = None
    error: Error | None = None


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The engine is warm and its loop runs: what the server needs to serve and to log."""
    pid: int
    info: EngineInfo
    served_name: str
    tokenizer_dir: str | None         # the model folder, or --tokenizer
    server: dict[str, Any]            # the resolved `server` section (host, port, ...)
    num_adapters: int


class Failed(msgspec.Struct, tag=True, array_like=True):
    """The engine could not be built (a config, weights or adapter error naming its file)."""
    message: str


FromEngine = Union[Outputs, Reply, Ready, Failed]


def out_of(request_id: str, o: Output) -> Out:
    return Out(request_id, o.token_ids, o.logprobs, o.finish_reason, o.num_prompt_tokens,
               None if o.error is None else error_of(o.error))


def refusal(raw: bytes, e: Exception) -> Outputs | Reply | None:
    """The answer to a `Submit` or `Call` whose fields do not decode, so that its caller gets
    an error instead of waiting forever; None for a message nobody waits on."""
    try:
        loose = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return None
    if not (isinstance(loose, list) and len(loose) > 1):
        return None
    err = Error("InvalidRequest", f"the engine cannot read the request: {e}")
    if loose[0] == "Submit" and isinstance(loose[1], str):
        return Outputs([Out(loose[1], [], [], error=err)])
    if loose[0] == "Call" and isinstance(loose[1], int):
        return Reply(loose[1], error=err)
    return None


encode = msgspec.msgpack.encode
decode_to_engine = msgspec.msgpack.Decoder(ToEngine).decode
decode_from_engine = msgspec.msgpack.Decoder(FromEngine).decode
