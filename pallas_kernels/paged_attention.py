"""Attention that reads (and writes) the KV cache where it lies in the unified pool: the
dispatch points the model calls, to the Mosaic GPU kernels (`paged_attention_mgpu`,
`prefill_attention_mgpu`) or to their specification (`attention_reference`).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import paged_attention_mgpu, prefill_attention_mgpu
from pallas_kernels.attention_reference import (  # noqa: F401  (the references, re-exported)
    decode_attention_reference, prefill_attention_reference)
from pallas_kernels.geometry import kv_page_view
from pallas_kernels.lora import BACKENDS, resolve_backend  # noqa: F401  (one rule for both)


def decode_attention(q, layer, kv_pages, lengths, layout, sliding_window=None,
                     backend="reference"):
    """Dispatch point for decode attention over the pool."""
    backend = resolve_backend(backend)
    if backend == "reference":
        return decode_attention_reference(q, layer, kv_pages, lengths, layout, sliding_window)
    if backend == "pallas":
        return paged_attention_mgpu.decode_attention(q, layer, kv_pages, lengths, layout,
                                                     sliding_window)
    raise ValueError(f"unknown attention backend '{backend}' (have {BACKENDS})")


def prefill_attention(q, k, v, seq_ids, positions, sliding_window=None, backend="reference",
                      key_only_rows=0):
    """Dispatch point for packed causal prefill attention. `key_only_rows`: the first rows
    are keys for later rows only, their own outputs unused (the kernel skips their work)."""
    backend = resolve_backend(backend)
    if backend == "reference":
        return prefill_attention_reference(q, k, v, seq_ids, positions, sliding_window)
    if backend == "pallas":
        return prefill_attention_mgpu.prefill_attention(q, k, v, seq_ids, positions,
                                                        sliding_window,
                                                        key_only_rows=key_only_rows)
    raise ValueError(f"unknown attention backend '{backend}' (have {BACKENDS})")


def continued_prefill_attention(q, k, v, seq_ids, positions, layer, prefix_pages, prefix_len,
                                layout, sliding_window=None, backend="reference"):
    """Packed causal prefill attention where the first packed prompt continues a prompt
    prefilled in chunks: its first `prefix_len` tokens' K/V already lie in the pool, in
    `prefix_pages` [Pk] of `layer`, and its rows here have positions prefix_len, ..
    Its rows attend to that prefix and to their own chunk; every other prompt starts at
    position 0, as in `prefill_attention`. `prefix_len` may be 0 (nothing continued).

    The prefix is gathered from its pages and laid before the packed tokens, ending
    where the continuing rows begin, so that the keys of every row are again one
    contiguous run ending at the row itself: the packed kernel needs no change. Its
    capacity is static (Pk pages' worth of tokens) and costs a gather and that many
    more (one-tile) query rows per layer, so the engine compiles this form apart and
    uses it only for steps that continue a prompt (no data-dependent branch on the
    device, which XLA:GPU would resolve on the host).
    """
    tpp = layout.tokens_per_page
    cap = prefix_pages.shape[0] * tpp
    pos = prefix_len - cap + jnp.arange(cap, dtype=jnp.int32)       # right-aligned prefix
    valid = pos >= 0
    p = jnp.maximum(pos, 0)
    kv = kv_page_view(layer, layout)[prefix_pages[p // tpp], :, p % tpp]  # [cap, 2, nkv, d]
    kv = jnp.where(valid[:, None, None, None], kv, 0).astype(k.dtype)
    kf = jnp.concatenate([kv[:, 0], k])
    vf = jnp.concatenate([kv[:, 1], v])
    qf = jnp.concatenate([jnp.zeros((cap,) + q.shape[1:], q.dtype), q])
    sf = jnp.concatenate([jnp.where(valid, seq_ids[0], -1), seq_ids])
    pf = jnp.concatenate([jnp.where(valid, pos, 0), positions])
    out = prefill_attention(qf, kf, vf, sf, pf, sliding_window, backend, key_only_rows=cap)
    return out[cap:]
