"""What a request is and how it can fail, on both sides of the engine boundary: the
request the server hands the engine, the engine's self-description, the errors that
each map to one HTTP status, and the seed of each of a request's samples."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

from slora_jax.batching import Sampling


# --- request errors (each maps to one HTTP status) ------------------------------------

class RequestError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class InvalidRequest(RequestError):
    pass


class UnknownAdapter(RequestError):
    status, code = 404, "model_not_found"


class Overloaded(RequestError):
    status, type, code = 429, "server_overloaded", "queue_full"


class Unavailable(RequestError):
    status, type, code = 503, "service_unavailable", "unavailable"


class SloAbort(Unavailable):
    code = "slo_abort"


class AdapterLoadFailed(RequestError):
    status, type, code = 500, "server_error", "adapter_load_failed"


# --- requests ---------------------------------------------------------------------------

@dataclasses.dataclass
class GenerationRequest:
    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    stop_token_ids: frozenset[int] = frozenset()
    ttft_slo_s: float | None = None       # overrides the scheduler's first-token SLO
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs to know of an engine (in this process or another)."""
    model_name: str
    vocab_size: int
    max_context: int
    max_prompt_tokens: int
    eos_token_ids: tuple[int, ...] = ()


def sample_seed(seed: int, j: int) -> int:
    """The seed of a request's `j`-th sample: the request's own for the first (so `n=1`
    and the first of `n` agree), a hash of (seed, j) for the others."""
    if j == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest(),
                          "little")
