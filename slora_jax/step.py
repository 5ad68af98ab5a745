"""The step functions: `prefill` and `decode`, each `(params, pool, batch) -> (pool, out)`.

Pure and jitted; the pool is donated, so XLA writes the new KV entries into
it in place (see `tests/test_step.py::test_pool_is_updated_in_place`). A batch
is a small pytree of int32/float32 arrays whose shapes come from a few
buckets, so a new mix of requests and adapters reuses the compiled step.

Research use (see README): build a `PrefillBatch`/`DecodeBatch` with
`slora_jax.batching`, or by hand, and call these directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import paged_attention as attn_ops
from pallas_kernels.lora_plan import slot_order
from slora_jax.model import (LoraBatch, StepSpec, lm_logits, lora_plans, sorts_tokens,
                             transformer)
from slora_jax.params import Params
from slora_jax.pool import Pool, kv_location, write_kv
from slora_jax.sampling import SamplingParams, sample


@struct.dataclass
class PrefillBatch:
    """R prompts packed into T tokens (prompts start at position 0)."""
    tokens: jax.Array      # [T] int32
    positions: jax.Array   # [T] int32
    seq_ids: jax.Array     # [T] int32 request index in [0, R); padding tokens use R
    kv_pages: jax.Array    # [R, Pk] int32 each request's KV page table (0 = null page)
    last_index: jax.Array  # [R] int32 index in T of each request's last prompt token
    req_slot: jax.Array    # [R] int32 adapter slot, -1 = base model only
    sampling: SamplingParams   # [R] each
    lora: LoraBatch


@struct.dataclass
class DecodeBatch:
    """B requests, one new token each."""
    tokens: jax.Array      # [B] int32
    positions: jax.Array   # [B] int32 position of this token (context length - 1)
    kv_pages: jax.Array    # [B, Pk] int32
    req_slot: jax.Array    # [B] int32, -1 = base model only
    sampling: SamplingParams   # [B] each
    lora: LoraBatch


@struct.dataclass
class StepOutput:
    tokens: jax.Array            # [N] int32 sampled next token per request
    logprobs: jax.Array          # [N] float32 logprob of that token
    logits: jax.Array | None     # [N, V] or [T, V] float32, when spec.logits asks


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("pool",))
def prefill(params: Params, pool: Pool, batch: PrefillBatch, *, spec: StepSpec):
    """Run packed prompts, write their KV into the pool, sample each one's first token."""
    mc, layout = spec.model, spec.layout
    r = batch.kv_pages.shape[0]
    valid = batch.seq_ids < r
    seq = jnp.minimum(batch.seq_ids, r - 1)
    page, slot = kv_location(batch.kv_pages[seq], batch.positions, layout)
    page = jnp.where(valid, page, 0)
    token_slot = jnp.where(valid, batch.req_slot[seq], -1)

    def attend(li, pl, q, k, v):
        pl = write_kv(pl, k, v, page, slot, layout)
        out = attn_ops.prefill_attention(q, k, v, batch.seq_ids, batch.positions,
                                         mc.sliding_window, backend=spec.attention_backend)
        return pl, out

    lora = lora_plans(spec, batch.lora, token_slot, pool, prefill=True)
    pool, h = transformer(params, pool, batch.tokens, batch.positions, attend, lora, spec)
    h_last = h[batch.last_index]
    logits = lm_logits(params, h_last)
    tokens, logprobs = sample(logits, batch.sampling, batch.positions[batch.last_index] + 1)
    extra = {"none": None, "last": logits, "all": None}[spec.logits]
    if spec.logits == "all":
        extra = lm_logits(params, h)
    return pool, StepOutput(tokens=tokens, logprobs=logprobs, logits=extra)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("pool",))
def decode(params: Params, pool: Pool, batch: DecodeBatch, *, spec: StepSpec):
    """One token for each of B requests: write its KV, attend over its pages, sample.

    Where the Pallas LoRA plan sorts tokens by adapter (`model.sorts_tokens`), the rows
    are sorted here, once, and the hidden states put back in the batch's order after
    the last layer: the requests are independent, so every layer runs on the sorted
    rows and no layer gathers x or un-sorts its LoRA terms."""
    mc, layout = spec.model, spec.layout
    rows = (batch.tokens, batch.positions, batch.kv_pages, batch.req_slot)
    group = sorts_tokens(spec, batch.lora, batch.tokens.shape[0])
    if group:
        order, where = slot_order(batch.req_slot, batch.lora.slot_pages.shape[0])
        rows = tuple(a[order] for a in rows)
    tokens, positions, kv_pages, req_slot = rows
    page, slot = kv_location(kv_pages, positions, layout)
    lengths = positions + 1

    def attend(li, pl, q, k, v):
        pl = write_kv(pl, k, v, page, slot, layout)
        out = attn_ops.decode_attention(q, pl, kv_pages, lengths, layout,
                                        mc.sliding_window, backend=spec.attention_backend)
        return pl, out

    lora = lora_plans(spec, batch.lora, req_slot, pool, grouped=group)
    pool, h = transformer(params, pool, tokens, positions, attend, lora, spec)
    if group:
        h = h[where]                                    # back to the batch's row order
    logits = lm_logits(params, h)
    tokens, logprobs = sample(logits, batch.sampling, batch.positions + 1)
    return pool, StepOutput(tokens=tokens, logprobs=logprobs,
                            logits=None if spec.logits == "none" else logits)
