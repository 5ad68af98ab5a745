"""The step functions: `prefill`, `decode` and `mixed` (decode rows and prefill chunks in
one pass), each `(params, pool, batch) -> (pool, out)`.

Pure and jitted; the pool is donated, so XLA writes the new KV entries into
it in place (see `tests/test_step.py::test_pool_is_updated_in_place`). A batch
is a small pytree of int32/float32 arrays whose shapes come from a few
buckets, so a new mix of requests and adapters reuses the compiled step.

Research use (see README): build a `PrefillBatch`/`DecodeBatch`/`MixedBatch` with
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
    # int32 scalar, or None: the first request continues a prompt prefilled in chunks;
    # this many of its tokens are in the pool already and its positions start there.
    # Static whether it is given: a step that continues a prompt is its own compiled form.
    prefix_len: jax.Array | None = None


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
class MixedBatch:
    """One step of decode rows and prefill chunks (Sarathi-style): the B running requests'
    next tokens, then prompts or chunks of prompts packed as a `PrefillBatch`. Both halves
    share `prefill.lora`'s adapter slots; `decode.lora` is not read (build it empty)."""
    decode: DecodeBatch
    prefill: PrefillBatch


@struct.dataclass
class StepOutput:
    tokens: jax.Array            # [N] int32 sampled next token per request
    logprobs: jax.Array          # [N] float32 logprob of that token
    logits: jax.Array | None     # [N, V] or [T, V] float32, when spec.logits asks


def _prefill_rows(batch: PrefillBatch, layout):
    """Each packed token's KV page and in-page slot, and its adapter slot (padding: the
    null page, no adapter)."""
    r = batch.kv_pages.shape[0]
    valid = batch.seq_ids < r
    seq = jnp.minimum(batch.seq_ids, r - 1)
    page, slot = kv_location(batch.kv_pages[seq], batch.positions, layout)
    return jnp.where(valid, page, 0), slot, jnp.where(valid, batch.req_slot[seq], -1)


def _prefill_attend(batch: PrefillBatch, spec: StepSpec, pl, q, k, v):
    """Attention of the packed prompts (after their K/V are in `pl`)."""
    window, backend = spec.model.sliding_window, spec.attention_backend
    if batch.prefix_len is None:
        return attn_ops.prefill_attention(q, k, v, batch.seq_ids, batch.positions, window,
                                          backend=backend)
    return attn_ops.continued_prefill_attention(q, k, v, batch.seq_ids, batch.positions, pl,
                                                batch.kv_pages[0], batch.prefix_len,
                                                spec.layout, window, backend=backend)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("pool",))
def prefill(params: Params, pool: Pool, batch: PrefillBatch, *, spec: StepSpec):
    """Run packed prompts, write their KV into the pool, sample each one's first token
    (a chunk's token is meaningless unless it ends its prompt)."""
    layout = spec.layout
    page, slot, token_slot = _prefill_rows(batch, layout)

    def attend(li, pl, q, k, v):
        pl = write_kv(pl, k, v, page, slot, layout)
        return pl, _prefill_attend(batch, spec, pl, q, k, v)

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
def mixed(params: Params, pool: Pool, batch: MixedBatch, *, spec: StepSpec):
    """Decode rows and prefill chunks in one pass: every layer's weights are read once for
    both, so admitting requests does not stall the running ones. Returns B + R tokens:
    each decode row's next token, then each packed prompt's (as `prefill`)."""
    mc, layout = spec.model, spec.layout
    d, p = batch.decode, batch.prefill
    b = d.tokens.shape[0]
    rows = (d.tokens, d.positions, d.kv_pages, d.req_slot)
    group = sorts_tokens(spec, p.lora, b)
    if group:
        # Decode rows ordered by adapter, as `decode` does: the LoRA kernels' token tiles
        # then hold few adapters each (the prompts' tokens are runs already).
        order, where = slot_order(d.req_slot, p.lora.slot_pages.shape[0])
        rows = tuple(a[order] for a in rows)
    d_tokens, d_positions, d_kv_pages, d_req_slot = rows
    d_page, d_slot = kv_location(d_kv_pages, d_positions, layout)
    p_page, p_slot, p_adapter = _prefill_rows(p, layout)
    page, slot = jnp.concatenate([d_page, p_page]), jnp.concatenate([d_slot, p_slot])
    tokens = jnp.concatenate([d_tokens, p.tokens])
    positions = jnp.concatenate([d_positions, p.positions])
    token_slot = jnp.concatenate([d_req_slot, p_adapter])

    def attend(li, pl, q, k, v):
        pl = write_kv(pl, k, v, page, slot, layout)
        out_d = attn_ops.decode_attention(q[:b], pl, d_kv_pages, d_positions + 1, layout,
                                          mc.sliding_window, backend=spec.attention_backend)
        out_p = _prefill_attend(p, spec, pl, q[b:], k[b:], v[b:])
        return pl, jnp.concatenate([out_d, out_p])

    lora = lora_plans(spec, p.lora, token_slot, pool, prefill=True)
    pool, h = transformer(params, pool, tokens, positions, attend, lora, spec)
    h_d = h[:b][where] if group else h[:b]              # back to the batch's row order
    logits = lm_logits(params, jnp.concatenate([h_d, h[b + p.last_index]]))
    samp = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), d.sampling, p.sampling)
    next_pos = jnp.concatenate([d.positions, p.positions[p.last_index]]) + 1
    tokens, logprobs = sample(logits, samp, next_pos)
    return pool, StepOutput(tokens=tokens, logprobs=logprobs,
                            logits=None if spec.logits == "none" else logits)


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
