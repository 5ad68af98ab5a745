"""Paged decode attention over the unified pool, as a Pallas Mosaic GPU kernel.

The kernel behind `pallas_kernels.paged_attention.decode_attention` when
`backend="pallas"`: the contract of `decode_attention_reference`, reading each
request's K/V pages where they lie in the pool (token-level paging with pages
of `tokens_per_page` tokens: K block then V block, see `slora_jax.pool`).

One block per (request, KV head, context split). The G = n_heads / n_kv query
heads that share a KV head are the rows of one wgmma (padded to 64: the H100
has no narrower wgmma), so each K/V byte is read once for all of them (GQA).
Each step takes `block_kv` tokens = `block_kv / tokens_per_page` pages, one TMA
copy per page for K and one for V (the H100 has no TMA gather), pipelined
`num_stages` deep; the softmax is the online (flash) form in float32 with
exp2. With `num_splits > 1` the context is split across blocks and XLA merges
the partial results by their log-sum-exp (flash-decoding), which keeps the
GPU busy when batch x KV heads is small.

Prefill attention (causal, packed ragged prompts) is in `prefill_attention_mgpu`.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import default_interpret, smem_transforms, warn_once
from pallas_kernels import paged_attention as attn_ref
from slora_jax.pool import PoolLayout

_log = logging.getLogger(__name__)
_warned: set[str] = set()
_LOG2E = math.log2(math.e)
_M_INIT = -1e30          # finite, so that a fully masked step never makes NaN


def _fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"paged_attention_mgpu: {what}; using the jnp reference")


# --- decode kernel --------------------------------------------------------------

def _decode_kernel(q_ref, kv_ref, pages_ref, len_ref, o_ref, m_ref, l_ref,
                   q_smem, k_smem, v_smem, p_smem, o_smem, ml_smem, qbar, bars, *,
                   block_kv, tpp, num_stages, num_splits, window, rows_q, pk, nkv):
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    split = lax.axis_index("s")
    hd = q_smem.shape[1]
    col = pl.multiple_of(h * hd, 64)
    ppb = block_kv // tpp                                   # pages per step
    length = len_ref[b]
    last = (length + block_kv - 1) // block_kv              # steps over [0, length)
    first = 0
    if window is not None:
        first = jnp.maximum(length - window, 0) // block_kv
    per_split = (last - first + num_splits - 1) // num_splits
    s0 = jnp.minimum(first + split * per_split, last)
    s1 = jnp.minimum(s0 + per_split, last)
    n_steps = s1 - s0

    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(pl.multiple_of((b * nkv + h) * rows_q, 8), rows_q)],
                            q_smem.at[pl.ds(0, rows_q)], qbar)

    def issue(step, stage):
        for j in range(ppb):
            pidx = jnp.minimum(step * ppb + j, pk - 1)
            page = pages_ref[b, pidx]
            dst = pl.ds(j * tpp, tpp)
            plgpu.copy_gmem_to_smem(kv_ref.at[page, pl.ds(0, tpp), pl.ds(col, hd)],
                                    k_smem.at[stage, dst], bars.at[stage])
            plgpu.copy_gmem_to_smem(kv_ref.at[page, pl.ds(tpp, tpp), pl.ds(col, hd)],
                                    v_smem.at[stage, dst], bars.at[stage])

    for i in range(num_stages):
        @pl.when(i < n_steps)
        def _prologue(i=i):
            issue(s0 + i, i)
    plgpu.barrier_wait(qbar)

    rows = q_smem.shape[0]
    m_i = plgpu.layout_cast(jnp.full((rows,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((rows, hd), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step_body(i, carry):
        acc, m_i, l_i = carry
        stage = lax.rem(i, num_stages)
        step = s0 + i
        plgpu.barrier_wait(bars.at[stage])

        def qk_scope(qk_ref):
            plgpu.wgmma(qk_ref, q_smem, k_smem.at[stage].T)
            plgpu.wgmma_wait(0)
            return qk_ref[...]
        s = pl.run_scoped(qk_scope, plgpu.ACC((rows, block_kv), jnp.float32))
        pos = step * block_kv + plgpu.broadcasted_iota(
            jnp.int32, (rows, block_kv), 1, layout=plgpu.Layout.WGMMA)
        live = pos < length
        if window is not None:
            live = live & (pos >= length - window)
        s = jnp.where(live, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        # P goes through SMEM: a wgmma operand (the register form is not interpretable).
        p_smem[...] = p.astype(p_smem.dtype)
        plgpu.commit_smem()

        def pv_scope(pv_ref):
            plgpu.wgmma(pv_ref, p_smem, v_smem.at[stage])
            plgpu.wgmma_wait(0)
            return pv_ref[...]
        acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((rows, hd), jnp.float32))

        @pl.when(i + num_stages < n_steps)
        def _refill():
            issue(step + num_stages, stage)
        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, n_steps, step_body, (acc, m_i, l_i))

    o_smem[...] = acc
    ml_smem[0] = m_i
    ml_smem[1] = l_i
    plgpu.commit_smem()
    blk = (b * nkv + h) * num_splits + split
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows_q)], o_ref.at[blk])
    plgpu.copy_smem_to_gmem(ml_smem.at[0, pl.ds(0, rows_q)], m_ref.at[blk])
    plgpu.copy_smem_to_gmem(ml_smem.at[1, pl.ds(0, rows_q)], l_ref.at[blk])
    plgpu.wait_smem_to_gmem(0)


def _decode_unsupported(layout: PoolLayout, dtype, block_kv: int) -> str | None:
    tpp, hd, kv = layout.tokens_per_page, layout.head_dim, layout.kv_size
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"pool dtype {jnp.dtype(dtype)} is not 16-bit"
    if hd % 64:
        return f"head_dim {hd} is not a multiple of 64"
    if tpp % 8:
        return f"tokens_per_page {tpp} is not a multiple of 8"
    if layout.page_elems % kv:
        return "a page is not a whole number of K/V rows"
    if block_kv % tpp or block_kv % 64 or block_kv > 256:
        return f"block_kv {block_kv} is not a multiple of tokens_per_page {tpp} and of 64, <= 256"
    return None


# Jitted with its static configuration: traced and lowered once per step
# function, not once per layer (Mosaic GPU lowering of each call costs seconds).
@functools.partial(jax.jit, static_argnames=(
    "bsz", "nkv", "block_kv", "tpp", "num_stages", "num_splits", "window", "rows_q",
    "interpret"))
def _decode_call(qs, kv, kv_pages, lengths, *, bsz, nkv, block_kv, tpp, num_stages, num_splits,
                 window, rows_q, interpret):
    hd = qs.shape[-1]
    dt = kv.dtype
    bkv = block_kv
    nblk = bsz * nkv * num_splits
    body = functools.partial(_decode_kernel, block_kv=bkv, tpp=tpp, num_stages=num_stages,
                             num_splits=num_splits, window=window, rows_q=rows_q,
                             pk=kv_pages.shape[1], nkv=nkv)
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((nblk, rows_q, hd), jnp.float32),
                  jax.ShapeDtypeStruct((nblk, rows_q), jnp.float32),
                  jax.ShapeDtypeStruct((nblk, rows_q), jnp.float32)),
        grid=(bsz, nkv, num_splits),
        grid_names=("b", "h", "s"),
        kernel_name="mgpu_paged_decode_attention",
        scratch_types=[
            plgpu.SMEM((64, hd), dt, transforms=smem_transforms(hd, dt)),
            plgpu.SMEM((num_stages, bkv, hd), dt, transforms=smem_transforms(hd, dt)),
            plgpu.SMEM((num_stages, bkv, hd), dt, transforms=smem_transforms(hd, dt)),
            plgpu.SMEM((64, bkv), dt, transforms=smem_transforms(bkv, dt)),
            plgpu.SMEM((64, hd), jnp.float32, transforms=smem_transforms(hd, jnp.float32)),
            plgpu.SMEM((2, 64), jnp.float32),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=2 * (bkv // tpp), num_barriers=num_stages),
        ],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(qs, kv, kv_pages, lengths)


def decode_attention(q: jax.Array, layer: jax.Array, kv_pages: jax.Array, lengths: jax.Array,
                     layout: PoolLayout, sliding_window: int | None = None, *,
                     block_kv: int | None = None, num_stages: int = 4,
                     num_splits: int | None = None, interpret=None) -> jax.Array:
    """q: [B, n_heads, hd]; layer: [P, page_size, H]; kv_pages: [B, Pk]; lengths: [B].

    Returns [B, n_heads, hd] float32. See `decode_attention_reference`.
    """
    bsz, nq, hd = q.shape
    nkv, tpp = layout.num_kv_heads, layout.tokens_per_page
    pk = kv_pages.shape[1]
    bkv = block_kv or max(64, tpp)
    why = _decode_unsupported(layout, layer.dtype, bkv)
    if why:
        _fallback(f"decode attention: {why}")
        return attn_ref.decode_attention_reference(q, layer, kv_pages, lengths, layout,
                                                   sliding_window)
    if interpret is None:
        interpret = default_interpret()
    g = nq // nkv
    rows_q = -(-g // 8) * 8
    max_steps = -(-pk * tpp // bkv)
    if num_splits is None:
        # Enough blocks to fill the GPU twice over, never more splits than steps.
        num_splits = max(1, min(max_steps, -(-264 // (bsz * nkv))))
    dt = layer.dtype
    # Fold the softmax scale and log2(e) into q; pad each KV head's G query rows to 8.
    qs = (q.astype(jnp.float32) * (hd ** -0.5 * _LOG2E)).astype(dt).reshape(bsz, nkv, g, hd)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, rows_q - g), (0, 0))).reshape(bsz * nkv * rows_q, hd)
    kv_rows = layout.page_elems // layout.kv_size
    kv = layer.reshape(layer.shape[0], kv_rows, layout.kv_size)     # free view
    o, m, l = _decode_call(qs, kv, kv_pages.astype(jnp.int32), lengths.astype(jnp.int32),
                           bsz=bsz, nkv=nkv, block_kv=bkv, tpp=tpp, num_stages=num_stages,
                           num_splits=num_splits, window=sliding_window, rows_q=rows_q,
                           interpret=interpret)
    # Merge the splits (flash-decoding): weights exp2(m_j - max m).
    o = o.reshape(bsz, nkv, num_splits, rows_q, hd)[:, :, :, :g]
    m = m.reshape(bsz, nkv, num_splits, rows_q)[:, :, :, :g]
    l = l.reshape(bsz, nkv, num_splits, rows_q)[:, :, :, :g]
    wgt = jnp.exp2(m - m.max(axis=2, keepdims=True))
    out = (o * wgt[..., None]).sum(axis=2) / (l * wgt).sum(axis=2)[..., None]
    return out.reshape(bsz, nq, hd)
