"""Host-side builders of step batches: numpy arrays padded to bucketed shapes.

This is the one host/device boundary: a scheduler describes its requests
with plain Python/numpy values, these functions pad them to the buckets of
an `EngineConfig`, and the result goes to the device in one `device_put`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from slora_jax.config import MODULES, EngineConfig
from slora_jax.model import LoraBatch
from slora_jax.pool import NULL_PAGE, PoolLayout
from slora_jax.sampling import SamplingParams
from slora_jax.step import DecodeBatch, MixedBatch, PrefillBatch


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    """An adapter resident in the pool, as a batch slot describes it."""
    pages: np.ndarray     # [n] int32
    rank: np.ndarray      # [M] int32
    scale: np.ndarray     # [M] float32
    offset: np.ndarray    # [M, 2] int32


INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
GREEDY_BELOW = 1e-5     # temperatures under this sample greedily (as vLLM): 1/t would overflow


class SamplingError(ValueError):
    """A sampling value the step's arrays cannot hold; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"'{field}': {message}")
        self.field = field


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass
class Sampling:
    temperature: float = 0.0    # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0          # (0, 1]; 1 = off
    top_k: int = 0              # [0, 2**31 - 1]; 0 = off
    seed: int = 0               # any int64/uint64; the device uses its low 31 bits

    def check(self) -> None:
        """Raise `SamplingError` for a value the step's float32/int32 arrays cannot hold.

        Requests are checked with this at every entry (HTTP, offline JSONL, the
        engine's own `validate`), so nothing a request carries can fail the
        engine thread when it builds a step."""
        t, p, k, s = self.temperature, self.top_p, self.top_k, self.seed
        if not _is_real(t) or not 0.0 <= t <= FLOAT32_MAX:
            raise SamplingError("temperature", f"must be a finite number >= 0, got {t!r}")
        if not _is_real(p) or not 0.0 < p <= 1.0:
            raise SamplingError("top_p", f"must be in (0, 1], got {p!r}")
        if not _is_int(k) or not 0 <= k <= INT32_MAX:
            raise SamplingError("top_k", f"must be an integer in [0, {INT32_MAX}] (0 = off), "
                                f"got {k!r}")
        if not _is_int(s) or not -2**63 <= s < 2**64:
            raise SamplingError("seed", f"must be a 64-bit integer, got {s!r}")


def slot_bucket(req_slot: Sequence[int], ec: EngineConfig) -> int:
    """0 slots when no request uses an adapter (the step then does no LoRA work)."""
    return ec.max_adapters_per_batch if any(s >= 0 for s in req_slot) else 0


def lora_batch(slots: Sequence[SlotInfo], num_slots: int, layout: PoolLayout) -> LoraBatch:
    m, pa = len(MODULES), layout.max_adapter_pages
    pages = np.full((num_slots, pa), NULL_PAGE, np.int32)
    rank = np.zeros((num_slots, m), np.int32)
    scale = np.zeros((num_slots, m), np.float32)
    offset = np.zeros((num_slots, m, 2), np.int32)
    if len(slots) > num_slots:
        raise ValueError(f"{len(slots)} adapters in one batch exceed {num_slots} slots")
    for i, s in enumerate(slots):
        pages[i, :len(s.pages)] = s.pages
        rank[i], scale[i], offset[i] = s.rank, s.scale, s.offset
    return LoraBatch(slot_pages=pages, slot_rank=rank, slot_scale=scale, slot_offset=offset)


def sampling_arrays(samp: Sequence[Sampling], n: int) -> SamplingParams:
    t = np.zeros(n, np.float32)
    p = np.ones(n, np.float32)
    k = np.zeros(n, np.int32)
    s = np.zeros(n, np.int32)
    for i, x in enumerate(samp):
        t[i] = x.temperature if x.temperature >= GREEDY_BELOW else 0.0
        p[i], k[i], s[i] = x.top_p, x.top_k, x.seed & 0x7FFFFFFF
    return SamplingParams(temperature=t, top_p=p, top_k=k, seed=s)


def max_kv_pages(ec: EngineConfig, layout: PoolLayout) -> int:
    return layout.kv_pages_for(ec.max_context)


def _page_table(pages: Sequence[np.ndarray], n: int, width: int) -> np.ndarray:
    out = np.full((n, width), NULL_PAGE, np.int32)
    for i, p in enumerate(pages):
        if len(p) > width:
            raise ValueError(f"request {i} holds {len(p)} KV pages, more than {width}")
        out[i, :len(p)] = p
    return out


def prefill_batch(prompts: Sequence[Sequence[int]], kv_pages: Sequence[np.ndarray],
                  req_slot: Sequence[int], sampling: Sequence[Sampling],
                  slots: Sequence[SlotInfo], ec: EngineConfig, layout: PoolLayout,
                  device_put: bool = True, starts: Sequence[int] | None = None,
                  num_requests: int | None = None,
                  num_tokens: int | None = None) -> PrefillBatch:
    """Pack R prompts into one prefill batch, padded to the token/request buckets
    (`num_tokens`, `num_requests`: the axes' sizes instead of their buckets).

    `starts`: each prompt's first position; given, the batch may continue a prompt
    prefilled in chunks (`PrefillBatch.prefix_len`), which must be the first (the
    others start at 0), and `prompts[i]` is then the chunk from `starts[i]` on."""
    n_tok = sum(len(p) for p in prompts)
    t = num_tokens or ec.bucket(ec.token_buckets(), n_tok, "prefill tokens")
    if n_tok > t:
        raise ValueError(f"{n_tok} prefill tokens exceed {t}")
    r = num_requests or ec.bucket(ec.request_buckets(), len(prompts), "prefill requests")
    if len(prompts) > r:
        raise ValueError(f"{len(prompts)} prompts exceed {r} prefill requests")
    if starts is not None and any(starts[1:]):
        raise ValueError("only the first packed prompt may continue at a position > 0, got "
                         f"starts {list(starts)}")
    tokens = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    seq_ids = np.full(t, r, np.int32)
    last = np.zeros(r, np.int32)
    off = 0
    for i, p in enumerate(prompts):
        n = len(p)
        start = starts[i] if starts is not None else 0
        tokens[off:off + n] = p
        positions[off:off + n] = np.arange(start, start + n)
        seq_ids[off:off + n] = i
        last[i] = off + n - 1
        off += n
    slot = np.full(r, -1, np.int32)
    slot[:len(req_slot)] = req_slot
    b = PrefillBatch(tokens=tokens, positions=positions, seq_ids=seq_ids,
                     kv_pages=_page_table(kv_pages, r, max_kv_pages(ec, layout)),
                     last_index=last, req_slot=slot, sampling=sampling_arrays(sampling, r),
                     lora=lora_batch(slots if slot_bucket(slot, ec) else [], slot_bucket(slot, ec),
                                     layout),
                     prefix_len=None if starts is None else np.int32(starts[0] if starts else 0))
    return jax.device_put(b) if device_put else b


def decode_batch(tokens: Sequence[int] | None, positions: Sequence[int],
                 kv_pages: Sequence[np.ndarray], req_slot: Sequence[int],
                 sampling: Sequence[Sampling], slots: Sequence[SlotInfo],
                 ec: EngineConfig, layout: PoolLayout, device_put: bool = True,
                 batch_size: int | None = None) -> DecodeBatch:
    """B requests' next tokens, padded to the batch bucket (or `batch_size`). `tokens=None`
    leaves zeros (the caller splices in the previous step's device-side tokens)."""
    n = len(positions)
    b = batch_size or ec.bucket(ec.batch_buckets(), n, "decode batch")
    if n > b:
        raise ValueError(f"{n} decode rows exceed the batch of {b}")
    tok = np.zeros(b, np.int32)
    if tokens is not None:
        tok[:n] = tokens
    pos = np.zeros(b, np.int32)
    pos[:n] = positions
    slot = np.full(b, -1, np.int32)
    slot[:n] = req_slot
    out = DecodeBatch(tokens=tok, positions=pos,
                      kv_pages=_page_table(kv_pages, b, max_kv_pages(ec, layout)),
                      req_slot=slot, sampling=sampling_arrays(sampling, b),
                      lora=lora_batch(slots if slot_bucket(slot, ec) else [], slot_bucket(slot, ec),
                                      layout))
    return jax.device_put(out) if device_put else out


def mixed_batch(decode: tuple, prefill: tuple, slots: Sequence[SlotInfo], ec: EngineConfig,
                layout: PoolLayout, device_put: bool = True, batch_size: int | None = None,
                num_requests: int | None = None, num_tokens: int | None = None) -> MixedBatch:
    """A `MixedBatch`: `decode` = (tokens or None, positions, kv_pages, req_slot, sampling)
    of the decode rows (padded to `batch_size`, default their bucket), `prefill` =
    (prompts, kv_pages, req_slot, sampling, starts) of the packed chunks; the req_slot
    values of both index `slots`."""
    tok, pos, kv, d_slot, d_samp = decode
    prompts, p_kv, p_slot, p_samp, starts = prefill
    d = decode_batch(tok, pos, kv, d_slot, d_samp, [], ec, layout, device_put=False,
                     batch_size=batch_size)
    p = prefill_batch(prompts, p_kv, p_slot, p_samp, [], ec, layout, device_put=False,
                      starts=starts, num_requests=num_requests, num_tokens=num_tokens)
    any_slot = any(s >= 0 for s in d_slot) or any(s >= 0 for s in p_slot)
    lora = lora_batch(slots if any_slot else [], ec.max_adapters_per_batch if any_slot else 0,
                      layout)
    d = d.replace(lora=lora_batch([], 0, layout))
    out = MixedBatch(decode=d, prefill=p.replace(lora=lora))
    return jax.device_put(out) if device_put else out
