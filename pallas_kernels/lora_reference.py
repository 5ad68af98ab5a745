"""The specification of the heterogeneous-batch LoRA terms, in plain jnp (gather-based: the
CPU default): shrink (x·A) and expand ((xA)·B) of one target module, for tokens of
many adapters of different ranks, read straight from the adapters' pool pages.
`lora_mgpu` computes the same with Mosaic GPU kernels; `lora` dispatches.

Adapter geometry (see `slora_jax.pool`): each adapter slot s of the batch has a
page table `slot_pages[s]`; its row stream holds A^T `[r, in]` at row offset
`a_offset[s]` and B `[r, out]` at `b_offset[s]`, each in its stored form
(`pallas_kernels.geometry.matrix_form`: flat, or column chunks for widths such as an
MLP's). `rank[s] == 0` means the slot does not target this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.geometry import GROUP, ceil_div, matrix_form


def gather_slot_matrix(rows: jax.Array, slot_pages: jax.Array, offset: jax.Array,
                       rank: jax.Array, width: int, max_rank: int,
                       page_size: int) -> jax.Array:
    """Gather each slot's `[max_rank, width]` matrix from pool rows, zero past its rank.

    rows: [N, H] pool rows; slot_pages: [S, Pa]; offset, rank: [S]. Reads either
    stored form (`pallas_kernels.geometry.matrix_form`).
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


def lora_apply_reference(x, rows, slot_pages, a_offset, b_offset, rank, scale, token_slot, *,
                         max_rank, out_features, page_size):
    """s·(x·A)·B per token: the shrink, then the expand."""
    xa = lora_shrink_reference(x, rows, slot_pages, a_offset, rank, token_slot,
                               max_rank=max_rank, page_size=page_size)
    return lora_expand_reference(xa, rows, slot_pages, b_offset, rank, scale, token_slot,
                                 out_features=out_features, page_size=page_size)
