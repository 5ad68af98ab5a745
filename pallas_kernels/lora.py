"""Heterogeneous-batch LoRA over the unified pool: the dispatch points the model calls
(`lora_shrink`, `lora_expand`, `lora_apply`, `lora_apply_modules`), to the Mosaic GPU
kernels (`lora_mgpu`) or to their specification (`lora_reference`), where S-LoRA's
MBGMM (prefill) and MBGMV (decode) contract is written down.
"""

from __future__ import annotations

import jax

from pallas_kernels import lora_mgpu
from pallas_kernels.geometry import check_option
from pallas_kernels.lora_reference import lora_expand_reference, lora_shrink_reference

BACKENDS = ("auto", "reference", "pallas")


def resolve_backend(backend: str) -> str:
    """"auto": the Pallas kernels on a GPU, the jnp reference elsewhere."""
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return backend


def lora_shrink(x, rows, slot_pages, a_offset, rank, token_slot, *, max_rank, page_size,
                backend="reference", plan=None):
    """Dispatch point for the shrink. See `lora_shrink_reference` for the contract.

    `plan` (Pallas only): `lora_plan.batch_plan(token_slot, S)`, computed once per
    step and shared by every module and layer; built here when not given.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return lora_shrink_reference(x, rows, slot_pages, a_offset, rank, token_slot,
                                     max_rank=max_rank, page_size=page_size)
    if backend == "pallas":
        return lora_mgpu.lora_shrink(x, rows, slot_pages, a_offset, rank, token_slot,
                                     max_rank=max_rank, page_size=page_size, plan=plan)
    raise ValueError(f"unknown LoRA backend '{backend}' (have {BACKENDS})")


def lora_expand(xa, rows, slot_pages, b_offset, rank, scale, token_slot, *, out_features,
                page_size, backend="reference", plan=None):
    """Dispatch point for the expand. See `lora_expand_reference` for the contract."""
    backend = resolve_backend(backend)
    if backend == "reference":
        return lora_expand_reference(xa, rows, slot_pages, b_offset, rank, scale, token_slot,
                                     out_features=out_features, page_size=page_size)
    if backend == "pallas":
        return lora_mgpu.lora_expand(xa, rows, slot_pages, b_offset, rank, scale, token_slot,
                                     out_features=out_features, page_size=page_size,
                                     plan=plan)
    raise ValueError(f"unknown LoRA backend '{backend}' (have {BACKENDS})")


def lora_apply(x, rows, slot_pages, a_offset, b_offset, rank, scale, token_slot, *, max_rank,
               out_features, page_size, backend="reference", plan=None):
    """The whole LoRA term of one module, s·(x·A)·B per token (shrink, then expand):
    the dispatch point the model calls. See the two references for the contract."""
    xa = lora_shrink(x, rows, slot_pages, a_offset, rank, token_slot, max_rank=max_rank,
                     page_size=page_size, backend=backend, plan=plan)
    return lora_expand(xa, rows, slot_pages, b_offset, rank, scale, token_slot,
                       out_features=out_features, page_size=page_size, backend=backend,
                       plan=plan)


def lora_apply_modules(x, rows, slot_pages, a_offsets, b_offsets, ranks, scales, token_slot, *,
                       max_rank, out_features, page_size, backend="reference", plan=None,
                       out="float32"):
    """The LoRA terms of several modules that read the same x (q/k/v, or gate/up).

    a_offsets, b_offsets, ranks, scales: [S, M]; out_features: M widths. Returns M arrays
    [T, out_m] float32, each `lora_apply` of its module. The Pallas backend runs one
    shrink launch for all M and one expand launch per distinct width, instead of M
    of each: at decode the launches, not the bytes, are most of the LoRA cost.
    `plan` (Pallas only): the token plan or `lora_plan.make_group_plan` of this group.
    `out`: "float32", or "pool" for terms rounded to the pool's dtype (the Pallas expand
    then writes half the bytes; `lora_mgpu.expand_out_dtype`).
    """
    n_mod = len(out_features)
    check_option("lora_out", out)
    if resolve_backend(backend) != "pallas":
        ys = tuple(lora_apply(x, rows, slot_pages, a_offsets[:, j], b_offsets[:, j],
                              ranks[:, j], scales[:, j], token_slot, max_rank=max_rank,
                              out_features=out_features[j], page_size=page_size,
                              backend=backend, plan=plan) for j in range(n_mod))
        return ys if out == "float32" else tuple(y.astype(rows.dtype) for y in ys)
    return lora_mgpu.lora_apply_multi(x, rows, slot_pages, a_offsets, b_offsets, ranks, scales,
                                      token_slot, max_rank=max_rank,
                                      out_features=tuple(out_features), page_size=page_size,
                                      plan=plan,
                                      out_dtype=lora_mgpu.expand_out_dtype(rows.dtype, out))
