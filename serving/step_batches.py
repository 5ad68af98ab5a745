"""A scheduled step as the step functions' arrays: the requests' rows padded to the
compiled shapes, their adapters as batch slots, and the token-buffer row each sampled
token goes to (padding, and a chunk that does not end its prompt: the dump row)."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.scheduler import Chunk, Seq
from slora_jax.batching import SlotInfo, decode_batch, lora_batch, mixed_batch
from slora_jax.config import EngineConfig
from slora_jax.pool import PoolLayout


def adapter_slots(seqs: list[Seq]) -> tuple[list[SlotInfo], list[int]]:
    """The distinct adapters of `seqs` in order of first use, and each request's slot
    (-1: the base model)."""
    order: dict[Any, int] = {}
    slots, req_slot = [], []
    for s in seqs:
        if s.entry is None:
            req_slot.append(-1)
            continue
        if s.entry not in order:
            order[s.entry] = len(slots)
            slots.append(s.entry.slot)
        req_slot.append(order[s.entry])
    return slots, req_slot


def with_all_slots(lora, slots, ec: EngineConfig, layout: PoolLayout):
    """A batch's LoRA slots, padded to max_adapters_per_batch even without adapters (for
    an engine that compiles no LoRA-free steps)."""
    if lora.slot_pages.shape[0]:
        return lora
    return lora_batch(slots, ec.max_adapters_per_batch, layout)


def prefill_step_batch(dec: list[Seq], chunks: list[Chunk], ec: EngineConfig,
                       layout: PoolLayout, dump_row: int, base_only_steps: bool = True):
    """A prefill step: decode rows padded to max_batch, prompts to max_prefill_requests,
    so one compiled shape per token bucket, and one more at the largest bucket for the
    steps that continue a prompt. Returns (MixedBatch, rows [max_batch + R])."""
    continues = chunks[0].start > 0
    slots, req_slot = adapter_slots(dec + [c.seq for c in chunks])
    nd = len(dec)
    b = mixed_batch(
        (None, [s.prompt_len + s.n_dispatched - 1 for s in dec], [s.kv_pages for s in dec],
         req_slot[:nd], [s.req.sampling for s in dec]),
        ([c.seq.prefill_tokens[c.start:c.end] for c in chunks], [c.seq.kv_pages for c in chunks],
         req_slot[nd:], [c.seq.req.sampling for c in chunks],
         [c.start for c in chunks] if continues else None),
        slots, ec, layout, device_put=False, batch_size=ec.max_batch,
        num_requests=ec.max_prefill_requests,
        num_tokens=ec.token_buckets()[-1] if continues else None)
    if not base_only_steps:
        b = b.replace(prefill=b.prefill.replace(
            lora=with_all_slots(b.prefill.lora, slots, ec, layout)))
    rows = np.full(ec.max_batch + ec.max_prefill_requests, dump_row, np.int32)
    rows[:nd] = [s.row for s in dec]
    for j, c in enumerate(chunks):
        if c.last:
            rows[ec.max_batch + j] = c.seq.row
    return b, rows


def decode_step_batch(seqs: list[Seq], ec: EngineConfig, layout: PoolLayout, dump_row: int,
                      base_only_steps: bool = True):
    """A decode step of every row in `seqs` (input tokens: the token buffer's).
    Returns (DecodeBatch, rows [B])."""
    slots, req_slot = adapter_slots(seqs)
    b = decode_batch(None, [s.prompt_len + s.n_dispatched - 1 for s in seqs],
                     [s.kv_pages for s in seqs], req_slot, [s.req.sampling for s in seqs],
                     slots, ec, layout, device_put=False)
    if not base_only_steps:
        b = b.replace(lora=with_all_slots(b.lora, slots, ec, layout))
    rows = np.full(b.positions.shape[0], dump_row, np.int32)
    rows[:len(seqs)] = [s.row for s in seqs]
    return b, rows
