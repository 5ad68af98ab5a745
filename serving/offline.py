"""Offline batch generation: many requests, many adapters, through the step functions.

The host-side driver behind `slora-jax generate`. Requests are validated up
front (unknown adapter, over-long prompt: an error result for that request,
the rest still run), then run in waves of up to `max_batch` requests: their
adapters are paged into the pool, their prompts are packed into prefill
calls, and one decode call per token serves the whole wave. The host stays
one step ahead: step n+1 is dispatched with step n's tokens still on the
device, and step n's tokens are read back while n+1 runs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from slora_jax.allocator import OutOfPages, PageAllocator, adapter_used_elems, kv_used_elems
from slora_jax.adapters import AdapterError, LoraAdapter, check_served_modules
from slora_jax.batching import Sampling, SamplingError, SlotInfo, decode_batch, prefill_batch
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.model import StepSpec
from slora_jax.params import Params
from slora_jax.pool import PoolLayout, init_pool, load_adapter_pages
from slora_jax.step import decode, prefill


class RequestError(ValueError):
    """A request we cannot run; the message names the field."""


@dataclasses.dataclass
class Request:
    id: str
    prompt_token_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class Result:
    id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None     # "stop" | "length"
    error: str | None = None


class OfflineEngine:
    def __init__(self, params: Params, mc: ModelConfig, ec: EngineConfig,
                 dtype=jnp.float32):
        self.params, self.mc, self.ec = params, mc, ec
        self.layout = PoolLayout.create(mc, ec)
        self.dtype = dtype
        self.pool = init_pool(self.layout, dtype)
        self.allocator = PageAllocator(ec.num_pages)
        self.spec = StepSpec.for_engine(mc, self.layout, ec)
        self.adapters: dict[str, LoraAdapter] = {}
        self.resident: dict[str, SlotInfo] = {}

    # -- adapters ----------------------------------------------------------------
    def add_adapter(self, adapter: LoraAdapter) -> None:
        try:
            check_served_modules(adapter.name, adapter.ranks, self.layout)
        except AdapterError as e:
            raise RequestError(str(e)) from None
        for m, r in adapter.ranks.items():
            if r > self.ec.max_rank:
                raise RequestError(f"adapter '{adapter.name}': rank {r} of module {m} exceeds "
                                   f"max_rank={self.ec.max_rank}")
        self.adapters[adapter.name] = adapter

    def _make_resident(self, name: str) -> SlotInfo:
        if name in self.resident:
            return self.resident[name]
        ad = self.adapters[name]
        rows, rank, scale, offset = ad.pack(self.layout)
        owner = ("adapter", name)
        pages = self.allocator.alloc(owner, rows.shape[1], "adapter")
        self.allocator.set_used(owner, adapter_used_elems(ad.ranks, self.layout))
        self.pool = load_adapter_pages(self.pool, jnp.asarray(pages), jnp.asarray(rows))
        info = SlotInfo(pages=pages, rank=rank, scale=scale, offset=offset)
        self.resident[name] = info
        return info

    def evict_adapter(self, name: str) -> None:
        if self.resident.pop(name, None) is not None:
            self.allocator.free(("adapter", name))

    # -- requests ----------------------------------------------------------------
    def validate(self, r: Request) -> None:
        if not r.prompt_token_ids:
            raise RequestError(f"request {r.id}: prompt is empty")
        bad = [t for t in r.prompt_token_ids if not 0 <= t < self.mc.vocab_size]
        if bad:
            raise RequestError(f"request {r.id}: token ids {bad[:5]} outside the vocabulary "
                               f"[0, {self.mc.vocab_size})")
        if r.adapter is not None and r.adapter not in self.adapters:
            raise RequestError(f"request {r.id}: unknown adapter '{r.adapter}'")
        if not isinstance(r.max_tokens, (int, np.integer)) or r.max_tokens < 1:
            raise RequestError(f"request {r.id}: max_tokens must be an integer >= 1")
        try:
            r.sampling.check()
        except SamplingError as e:
            raise RequestError(f"request {r.id}: {e}") from None
        n = len(r.prompt_token_ids)
        if n > self.ec.max_prefill_tokens:
            raise RequestError(f"request {r.id}: prompt of {n} tokens exceeds the prefill "
                               f"limit of {self.ec.max_prefill_tokens} tokens")
        if n + r.max_tokens > self.ec.max_context:
            raise RequestError(f"request {r.id}: prompt of {n} tokens plus max_tokens="
                               f"{r.max_tokens} exceeds the context of {self.ec.max_context}")

    def generate(self, requests: Sequence[Request], progress: bool = False) -> list[Result]:
        results: dict[str, Result] = {}
        ok: list[Request] = []
        for r in requests:
            try:
                self.validate(r)
                ok.append(r)
            except RequestError as e:
                results[r.id] = Result(r.id, [], [], error=str(e))
        waves = list(self._waves(ok))
        it: Iterable = waves
        if progress:
            from tqdm import tqdm
            it = tqdm(waves, desc="generate", unit="wave")
        for wave in it:
            for res in self._run_wave(wave):
                results[res.id] = res
        return [results[r.id] for r in requests]

    def _waves(self, reqs: list[Request]):
        wave: list[Request] = []
        names: set[str] = set()
        for r in reqs:
            new = {r.adapter} - names - {None}
            if wave and (len(wave) == self.ec.max_batch
                         or len(names | new) > self.ec.max_adapters_per_batch):
                yield wave
                wave, names = [], set()
            wave.append(r)
            names |= {r.adapter} - {None}
        if wave:
            yield wave

    def _run_wave(self, wave: list[Request]) -> list[Result]:
        lay = self.layout
        names = sorted({r.adapter for r in wave if r.adapter is not None})
        for name in list(self.resident):          # make room: drop idle adapters first
            if name not in names:
                self.evict_adapter(name)
        slots = [self._make_resident(n) for n in names]
        slot_of = {n: i for i, n in enumerate(names)}
        req_slot = [slot_of[r.adapter] if r.adapter else -1 for r in wave]
        kv = []
        try:
            for i, r in enumerate(wave):
                n = len(r.prompt_token_ids) + r.max_tokens
                owner = ("kv", r.id, i)
                kv.append(self.allocator.alloc(owner, lay.kv_pages_for(n), "kv"))
                self.allocator.set_used(owner, kv_used_elems(len(r.prompt_token_ids), lay))
        except OutOfPages:
            for i, r in enumerate(wave):
                self.allocator.free(("kv", r.id, i))
            if len(wave) == 1:
                r = wave[0]
                return [Result(r.id, [], [], error=f"request {r.id}: its KV cache does not fit "
                               f"in the pool ({self.allocator.num_free} pages free)")]
            half = len(wave) // 2         # the pool cannot hold the whole wave: split it
            return self._run_wave(wave[:half]) + self._run_wave(wave[half:])
        try:
            return self._decode_wave(wave, kv, req_slot, slots)
        finally:
            for i, r in enumerate(wave):
                self.allocator.free(("kv", r.id, i))

    def _decode_wave(self, wave, kv, req_slot, slots) -> list[Result]:
        ec, lay = self.ec, self.layout
        first_tok, first_lp = np.zeros(len(wave), np.int32), np.zeros(len(wave), np.float32)
        i = 0
        while i < len(wave):                      # pack prompts into prefill calls
            j, ntok = i, 0
            while (j < len(wave) and j - i < ec.max_prefill_requests
                   and ntok + len(wave[j].prompt_token_ids) <= ec.max_prefill_tokens):
                ntok += len(wave[j].prompt_token_ids)
                j += 1
            b = prefill_batch([r.prompt_token_ids for r in wave[i:j]], kv[i:j], req_slot[i:j],
                              [r.sampling for r in wave[i:j]], slots, ec, lay)
            self.pool, out = prefill(self.params, self.pool, b, spec=self.spec)
            first_tok[i:j] = np.asarray(out.tokens)[:j - i]
            first_lp[i:j] = np.asarray(out.logprobs)[:j - i]
            i = j

        toks = [[int(t)] for t in first_tok]
        lps = [[float(x)] for x in first_lp]
        done = [self._finished(r, toks[k]) for k, r in enumerate(wave)]
        steps = max(r.max_tokens for r in wave) - 1
        pos = np.array([len(r.prompt_token_ids) for r in wave], np.int32)
        samp = [r.sampling for r in wave]
        prev = None
        device_tokens = None
        for s in range(steps + 1):
            out = None
            if s < steps and not all(done):
                b = decode_batch(first_tok if device_tokens is None else None, pos + s, kv,
                                 req_slot, samp, slots, ec, lay)
                if device_tokens is not None:
                    b = b.replace(tokens=device_tokens)
                self.pool, out = decode(self.params, self.pool, b, spec=self.spec)
                device_tokens = out.tokens
            if prev is not None:                  # read step s-1 while step s runs
                t_host, lp_host = np.asarray(prev.tokens), np.asarray(prev.logprobs)
                for k, r in enumerate(wave):
                    if not done[k]:
                        toks[k].append(int(t_host[k]))
                        lps[k].append(float(lp_host[k]))
                        done[k] = self._finished(r, toks[k])
            prev = out
            if out is None:
                break
        return [Result(r.id, toks[k], lps[k],
                       finish_reason="stop" if toks[k][-1] in r.stop_token_ids else "length")
                for k, r in enumerate(wave)]

    @staticmethod
    def _finished(r: Request, toks: list[int]) -> bool:
        return len(toks) >= r.max_tokens or toks[-1] in r.stop_token_ids
