"""The OpenAI wire format: request models, response builders, and text <-> token ids.

Requests are pydantic models (unknown fields are ignored, as vLLM does);
a field we cannot honour (echo with logprobs, penalties, logit_bias, more than
one logprob alternative per token) is refused with a 400
naming it rather than silently dropped. `n` samples per prompt are `n`
requests to the engine; `best_of` samples keep the `n` of highest cumulative
log-probability.

Text. With a tokenizer (`tokenizer.json` in the model folder, or
`--tokenizer DIR`), prompts are encoded with it and outputs decoded
incrementally; chat messages are rendered with the `chat_template` of
`tokenizer_config.json` (Jinja2, sandboxed, as transformers does). Without
one (dummy and tiny models) token ids are the text: a prompt is a list of
ints, or a string of whitespace-separated ints; outputs are the ids joined
by single spaces (so streamed deltas are " 17"); chat message contents are
id strings concatenated in order, without a template.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


# --- requests --------------------------------------------------------------------------

INT32_MAX = 2**31 - 1
MAX_SAMPLES = 64              # n and best_of: each sample is a request in the engine's queue
MAX_STOPS, MAX_STOP_CHARS = 16, 1024   # every streamed token is searched for each stop string
MAX_SEQUENCES = 256           # prompts x samples of one HTTP request, so no one request fills
                              # the queue that every tenant shares (slora-jax generate: more)
FLOAT32_MAX = 3.4028234663852886e38


class _Req(BaseModel):
    # Numbers are bounded by what the step's arrays hold (int32, finite float32), so a
    # request is refused here with a 400 naming the field, never on the engine thread.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=FLOAT32_MAX)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=INT32_MAX)  # vLLM extension; 0 or -1 = off
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=1024)  # vLLM extension
    # First-token SLO of this request in seconds (S-LoRA's early abort); the server's
    # --ttft-slo when absent.
    ttft_slo_s: float | None = Field(default=None, ge=0.0, le=86400.0)
    ignore_eos: bool = False                          # vLLM extension
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, v):
        # Bounded so that one request's stop strings cannot take the HTTP process's time
        # from every other stream.
        items = [v] if isinstance(v, str) else v or []
        if len(items) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(items)}")
        if any(len(x) > MAX_STOP_CHARS for x in items):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a field set to something we cannot honour."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence/frequency penalties are not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Req):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=INT32_MAX)
    # the step computes the sampled token's logprob alone: more alternatives are refused
    logprobs: int | None = Field(default=None, ge=0, le=1)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    suffix: str | None = None

    def unsupported(self):
        if self.echo and self.logprobs is not None:
            return "echo", "echo with logprobs needs the prompt's logprobs, which are not computed"
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", f"best_of ({self.best_of}) must be at least n ({self.n})"
        if self.stream and self.samples() > self.n:
            return "best_of", "best_of > n cannot stream: the best are known at the end"
        n_prompts = len(self.prompts())
        if n_prompts * self.samples() > MAX_SEQUENCES:
            return "prompt", (f"{n_prompts} prompts x {self.samples()} samples each is over "
                              f"the {MAX_SEQUENCES} sequences one request may ask for")
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()

    def samples(self) -> int:
        """Sequences generated per prompt (best_of, at least n)."""
        return max(self.n, self.best_of or 1)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content
                           if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=1)
    add_generation_prompt: bool = True               # vLLM extension

    def samples(self) -> int:
        return self.n

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):                   # vLLM's /tokenize
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=256)
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):                 # vLLM's /detokenize
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=256)
    tokens: list[int]


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)


# --- responses -------------------------------------------------------------------------

def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_logprobs(codec: "TextCodec", ids: list[int], lps: list[float], top: int) -> dict:
    """OpenAI legacy logprobs. Only the sampled token's logprob is computed, so
    `top_logprobs` lists that token alone."""
    toks = [codec.token_text(t) for t in ids]
    offs, o = [], 0
    for t in toks:
        offs.append(o)
        o += len(t)
    return {"tokens": toks, "token_logprobs": lps,
            "top_logprobs": [{t: lp} for t, lp in zip(toks, lps)] if top else None,
            "text_offset": offs}


def chat_logprobs(codec: "TextCodec", ids: list[int], lps: list[float], top: int) -> dict:
    content = []
    for t, lp in zip(ids, lps):
        s = codec.token_text(t)
        b = list(s.encode("utf-8"))
        content.append({"token": s, "logprob": lp, "bytes": b,
                        "top_logprobs": [{"token": s, "logprob": lp, "bytes": b}] if top else []})
    return {"content": content}


def completion_response(rid: str, model: str, choices: list[dict], u: dict,
                        chunk: bool = False) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, **({} if chunk else {"usage": u})}


def chat_response(rid: str, model: str, choices: list[dict], u: dict | None,
                  chunk: bool = False) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
         "created": int(time.time()), "model": model, "choices": choices}
    if u is not None:
        d["usage"] = u
    return d


# --- text -------------------------------------------------------------------------------

class TextError(ValueError):
    """A prompt or message we cannot turn into token ids (a 400)."""


class TextCodec:
    """Token ids <-> text for one model: a `tokenizers.Tokenizer`, or ids-as-text."""

    def __init__(self, tokenizer=None, chat_template: str | None = None,
                 special: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = special or {}
        self._template = None

    @classmethod
    def from_dir(cls, path: str | None) -> "TextCodec":
        if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
            return cls()
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        template, special = None, {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            template = cfg.get("chat_template")
            if isinstance(template, list):       # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default") or next(iter(named.values()), None)
            for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
                v = cfg.get(k)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    special[k] = v
        return cls(tok, template, special)

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def eos_token_ids(self) -> set[int]:
        if self.tokenizer is None or "eos_token" not in self.special:
            return set()
        i = self.tokenizer.token_to_id(self.special["eos_token"])
        return set() if i is None else {i}

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        if self.tokenizer is not None:
            # encode_batch lets go of the interpreter lock (encode does not), so the server's
            # other streams go on while a long prompt is tokenized on a worker thread
            return self.tokenizer.encode_batch([prompt], add_special_tokens=True)[0].ids
        try:
            return [int(t) for t in prompt.split()]
        except ValueError:
            raise TextError("this model has no tokenizer: give the prompt as a list of token "
                            "ids, or a string of space-separated token ids") from None

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        if self.tokenizer is None:
            ids: list[int] = []
            for m in messages:
                ids += self.encode(m.text())
            return ids
        if not self.chat_template:
            raise TextError("this model has no chat template (tokenizer_config.json has no "
                            "chat_template); use /v1/completions")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise TextError(f"chat template: {msg}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
            self._template = env.from_string(self.chat_template)
        msgs = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
        try:
            text = self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except TextError:
            raise
        except Exception as e:  # noqa: BLE001 - a template error is the request's problem
            raise TextError(f"chat template failed: {e}") from None
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], long: bool = False) -> str:
        """`long`: through the batch call, which lets go of the interpreter lock (for a
        whole text on a worker thread; streaming decodes a few tokens at a time)."""
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        if long:
            return self.tokenizer.decode_batch([ids], skip_special_tokens=True)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def echo(self, prompt: str | list[int]) -> str:
        """The text `echo` puts before a completion: a prompt string as given, token ids
        decoded (without a tokenizer, followed by the space that separates ids)."""
        if isinstance(prompt, str) and self.tokenizer is not None:
            return prompt
        return self.decode(self.encode(prompt)) + (" " if self.tokenizer is None else "")

    def token_text(self, t: int) -> str:
        if self.tokenizer is None:
            return str(t)
        return self.tokenizer.decode([t], skip_special_tokens=False)


class IncrementalText:
    """Detokenize a growing list of ids, holding back what a stop string may still claim.

    `push(ids)` returns the text that is now final; once a stop string
    appears, the text is cut before it and `stopped` is set.

    Each push decodes a window of the last few tokens, not the whole output, so a token
    costs the same at the 2000th as at the first: the new text is what the window
    `ids[prefix:]` decodes to beyond what `ids[prefix:read]` decoded to (both with the same
    leading context, so a decoder that treats a first token's leading space specially
    treats both alike). A window ending inside a UTF-8 character ("\ufffd") waits for the
    tokens that complete it.
    """

    def __init__(self, codec: TextCodec, stops: list[str]):
        self.codec, self.stops = codec, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0      # ids[prefix:read]: decoded context; ids[read:]: new
        self.text = ""                   # everything decoded so far
        self.sent = 0
        self.stopped = False

    def _decode_new(self, final: bool = False) -> None:
        if self.read == len(self.ids):
            return
        known = self.codec.decode(self.ids[self.prefix:self.read])
        full = self.codec.decode(self.ids[self.prefix:])
        if (full.endswith("\ufffd") or len(full) <= len(known)) and not final:
            return                       # an incomplete character, or nothing new yet
        self.text += full[len(known):]
        self.prefix, self.read = self.read, len(self.ids)

    def _emit(self, hold: int) -> str:
        """The text now final: up to the first stop string, or all but `hold` chars."""
        text = self.text
        start = max(0, self.sent - self.hold)
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            cut = max(cut, self.sent)
            self.text = text[:cut]
            out, self.sent = text[self.sent:cut], cut
            return out
        end = max(self.sent, len(text) - hold)
        out, self.sent = text[self.sent:end], end
        return out

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        self._decode_new()
        return self._emit(self.hold)

    def flush(self) -> str:
        """At the end of generation: everything not yet sent (still cut at a stop string)."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        return self._emit(0)
