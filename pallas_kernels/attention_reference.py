"""The specification of attention over the unified pool, in plain jnp (the CPU default).

Decode: one query token per request, K/V gathered from the request's pages by
index (token-level paging as in S-LoRA/LightLLM, here with pages of
`tokens_per_page` tokens). Prefill: causal attention over ragged prompts
packed in one token array. The Mosaic GPU kernels (`paged_attention_mgpu`,
`prefill_attention_mgpu`) compute the same; `paged_attention` dispatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.geometry import KVLayout, kv_page_view

_NEG = -1e30


def _softmax_attend(q, k, v, mask, scale):
    """q: [N, Hkv, G, D]; k, v: [N, L, Hkv, D]; mask: [N, L] or [N, G?]. Float32 math."""
    s = jnp.einsum("nhgd,nlhd->nhgl", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, None, None, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    v = jnp.where(mask[:, :, None, None], v.astype(jnp.float32), 0.0)
    return jnp.einsum("nhgl,nlhd->nhgd", p, v)


def decode_attention_reference(q: jax.Array, layer: jax.Array, kv_pages: jax.Array,
                               lengths: jax.Array, layout: KVLayout,
                               sliding_window: int | None = None) -> jax.Array:
    """q: [B, n_heads, hd]; layer: [P, page_size, H]; kv_pages: [B, Pk]; lengths: [B]
    (tokens in context, the current one included). Returns [B, n_heads, hd] float32."""
    b, nq, d = q.shape
    nkv = layout.num_kv_heads
    kv = kv_page_view(layer, layout)[kv_pages]                     # [B, Pk, 2, tpp, nkv, d]
    kv = jnp.moveaxis(kv, 2, 0).reshape(2, b, -1, nkv, d)          # [2, B, L, nkv, d]
    pos = jnp.arange(kv.shape[2])[None, :]
    mask = pos < lengths[:, None]
    if sliding_window is not None:
        mask &= pos >= lengths[:, None] - sliding_window
    out = _softmax_attend(q.reshape(b, nkv, nq // nkv, d), kv[0], kv[1], mask, d ** -0.5)
    return out.reshape(b, nq, d)


def prefill_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                seq_ids: jax.Array, positions: jax.Array,
                                sliding_window: int | None = None) -> jax.Array:
    """Causal attention within each packed prompt (prompts start at position 0).

    q: [T, n_heads, hd]; k, v: [T, n_kv, hd]; seq_ids, positions: [T].
    Returns [T, n_heads, hd] float32. A prompt's rows never depend on another
    prompt's q/k/v, finite or not; the rows of a prompt whose own q/k/v are not
    finite are unspecified (here non-finite values of v are read as 0).
    """
    t, nq, d = q.shape
    nkv = k.shape[1]
    mask = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])
    if sliding_window is not None:
        mask &= positions[None, :] > positions[:, None] - sliding_window
    qg = q.reshape(t, nkv, nq // nkv, d).astype(jnp.float32)
    s = jnp.einsum("thgd,lhd->hgtl", qg, k.astype(jnp.float32)) * d ** -0.5
    s = jnp.where(mask[None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    # P @ V runs over every packed key, and p = 0 for another prompt's key is exact
    # but 0 * NaN is NaN: with v finite, a hidden key adds exactly 0 to a row.
    v = v.astype(jnp.float32)
    out = jnp.einsum("hgtl,lhd->thgd", p, jnp.where(jnp.isfinite(v), v, 0.0))
    return out.reshape(t, nq, d)
