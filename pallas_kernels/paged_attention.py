"""Attention that reads (and writes) the KV cache where it lies in the unified pool: the
dispatch points the model calls, to the Mosaic GPU kernels (`paged_attention_mgpu`,
`prefill_attention_mgpu`) or to their specification (`attention_reference`).
"""

from __future__ import annotations

from pallas_kernels import paged_attention_mgpu, prefill_attention_mgpu
from pallas_kernels.attention_reference import (  # noqa: F401  (the references, re-exported)
    decode_attention_reference, prefill_attention_reference)
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


def prefill_attention(q, k, v, seq_ids, positions, sliding_window=None, backend="reference"):
    """Dispatch point for packed causal prefill attention."""
    backend = resolve_backend(backend)
    if backend == "reference":
        return prefill_attention_reference(q, k, v, seq_ids, positions, sliding_window)
    if backend == "pallas":
        return prefill_attention_mgpu.prefill_attention(q, k, v, seq_ids, positions,
                                                        sliding_window)
    raise ValueError(f"unknown attention backend '{backend}' (have {BACKENDS})")
