"""Heterogeneous-batch LoRA over the unified pool: shrink (x·A) and expand ((xA)·B).

S-LoRA's MBGMM (prefill) and MBGMV (decode) compute, for a batch whose tokens
use different adapters of different ranks, the LoRA term of one target
module straight from the adapters' pool pages. This file holds the
specification (`*_reference`, plain jnp, gather-based: the CPU default) and the
dispatch point the model calls (`lora_shrink`, `lora_expand`).

Adapter geometry (see `slora_jax.pool`): each adapter slot s of the batch has a
page table `slot_pages[s]`; its row stream holds A^T `[r, in]` at row offset
`a_offset[s]` and B `[r, out]` at `b_offset[s]`, each in its stored form
(`slora_jax.pool.matrix_form`: flat, or column chunks for widths such as an MLP's). `rank[s] == 0` means the slot does not target this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slora_jax.config import ceil_div, check_option
from slora_jax.pool import GROUP, matrix_form

BACKENDS = ("auto", "reference", "pallas")


def resolve_backend(backend: str) -> str:
    """"auto": the Pallas kernels on a GPU, the jnp reference elsewhere."""
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return backend


def gather_slot_matrix(rows: jax.Array, slot_pages: jax.Array, offset: jax.Array,
                       rank: jax.Array, width: int, max_rank: int,
                       page_size: int) -> jax.Array:
    """Gather each slot's `[max_rank, width]` matrix from pool rows, zero past its rank.

    rows: [N, H] pool rows; slot_pages: [S, Pa]; offset, rank: [S]. Reads either
    stored form (`slora_jax.pool.matrix_form`).
    """
    h = rows.shape[-1]
    c, chunks = matrix_form(width, h)
    if chunks == 1:
        n = ceil_div(max_rank * width, h)
        j = offset[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]          # [S, n]
        page = jnp.take_along_axis(slot_pages,
                                   jnp.minimum(j // page_size, slot_pages.shape[1] - 1), axis=1)
        got = rows[page * page_size + j % page_size]                          # [S, n, H]
        mat = got.reshape(got.shape[0], n * h)[:, :max_rank * width]
        mat = mat.reshape(-1, max_rank, width)
    else:
        per = h // c                                      # C-wide rows per pool row
        view = rows.reshape(-1, c)
        stride = (rank + GROUP - 1) // GROUP * GROUP      # rank rows per chunk, padded
        i = jnp.arange(max_rank, dtype=jnp.int32)
        ch = jnp.arange(chunks, dtype=jnp.int32)
        j = (offset * per)[:, None, None] + ch[None, None, :] * stride[:, None, None] \
            + i[None, :, None]                                               # [S, R, chunks]
        page = jnp.take_along_axis(
            slot_pages, jnp.minimum(j // (page_size * per), slot_pages.shape[1] - 1).reshape(
                j.shape[0], -1), axis=1).reshape(j.shape)
        mat = view[page * (page_size * per) + j % (page_size * per)]          # [S, R, chunks, C]
        mat = mat.reshape(-1, max_rank, width)
    live = jnp.arange(max_rank)[None, :, None] < rank[:, None, None]
    return jnp.where(live, mat, 0)


def _token_matrices(rows, slot_pages, offset, rank, token_slot, width, max_rank, page_size):
    """Each token's `[max_rank, width]` matrix of its slot: [T, R, width]. Gathered per
    slot and indexed by token when the batch has at least as many tokens as slots;
    gathered per token when it has fewer (a decode step of a few requests in a step
    compiled for many slots reads only the adapters its tokens use)."""
    s = jnp.clip(token_slot, 0, slot_pages.shape[0] - 1)
    if token_slot.shape[0] < slot_pages.shape[0]:
        return gather_slot_matrix(rows, slot_pages[s], offset[s], rank[s], width, max_rank,
                                  page_size)
    return gather_slot_matrix(rows, slot_pages, offset, rank, width, max_rank, page_size)[s]


def lora_shrink_reference(x: jax.Array, rows: jax.Array, slot_pages: jax.Array,
                          a_offset: jax.Array, rank: jax.Array, token_slot: jax.Array,
                          *, max_rank: int, page_size: int) -> jax.Array:
    """xa[t] = x[t] · A_{slot(t)}: [T, in] -> [T, max_rank] float32; 0 where slot(t) < 0."""
    a = _token_matrices(rows, slot_pages, a_offset, rank, token_slot, x.shape[-1], max_rank,
                        page_size)                                             # [T, R, in]
    xa = jnp.einsum("ti,tri->tr", x.astype(jnp.float32), a.astype(jnp.float32))
    return jnp.where(token_slot[:, None] >= 0, xa, 0.0)


def lora_expand_reference(xa: jax.Array, rows: jax.Array, slot_pages: jax.Array,
                          b_offset: jax.Array, rank: jax.Array, scale: jax.Array,
                          token_slot: jax.Array, *, out_features: int,
                          page_size: int) -> jax.Array:
    """y[t] = (scale_{slot(t)} · xa[t]) · B_{slot(t)}: [T, R] -> [T, out] float32.

    scale · xa is rounded to the pool dtype first (a no-op for a float32 pool): the
    kernels feed it to the tensor cores in that dtype, and so does this reference.
    """
    max_rank = xa.shape[-1]
    b = _token_matrices(rows, slot_pages, b_offset, rank, token_slot, out_features, max_rank,
                        page_size)                                             # [T, R, out]
    s = jnp.clip(token_slot, 0, slot_pages.shape[0] - 1)
    xs = (xa * scale[s][:, None]).astype(rows.dtype).astype(jnp.float32)
    y = jnp.einsum("tr,tro->to", xs, b.astype(jnp.float32))
    return jnp.where(token_slot[:, None] >= 0, y, 0.0)


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
        from pallas_kernels import lora_mgpu
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
        from pallas_kernels import lora_mgpu
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
    from pallas_kernels import lora_mgpu
    return lora_mgpu.lora_apply_multi(x, rows, slot_pages, a_offsets, b_offsets, ranks, scales,
                                      token_slot, max_rank=max_rank,
                                      out_features=tuple(out_features), page_size=page_size,
                                      plan=plan,
                                      out_dtype=lora_mgpu.expand_out_dtype(rows.dtype, out))
