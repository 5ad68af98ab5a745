"""Paged decode attention over the unified pool, as a Pallas Mosaic GPU kernel.

The kernel behind `pallas_kernels.paged_attention.decode_attention` when
`backend="pallas"`: the contract of `decode_attention_reference`, reading each
request's K/V pages where they lie in the pool (token-level paging with pages
of `tokens_per_page` tokens: K block then V block, see `slora_jax.pool`).

One block per (request, group of KV heads, context split). The G = n_heads /
n_kv query heads that share a KV head are rows of one wgmma, so each K/V byte
is read once for all of them (GQA); the query rows of several KV heads (padded
to 8 each) are stacked to fill the wgmma's 64 rows (the H100 has no narrower
one), and the block runs one pipelined loop over (head, KV step), keeping only
the current head's rows at each step. Each step takes `block_kv` tokens =
`block_kv / tokens_per_page` pages, one TMA copy per page for K and one for V (the H100 has no TMA gather), pipelined
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
from pallas_kernels import attention_reference as attn_ref
from pallas_kernels.geometry import KVLayout

_log = logging.getLogger(__name__)
_warned: set[str] = set()
_LOG2E = math.log2(math.e)
_M_INIT = -1e30          # finite, so that a fully masked step never makes NaN


def _fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"paged_attention_mgpu: {what}; using the jnp reference")


# --- decode kernel --------------------------------------------------------------

def _decode_kernel(q_ref, kv_ref, pages_ref, len_ref, o_ref, m_ref, l_ref,
                   q_smem, k_smem, v_smem, p_smem, o_smem, ml_smem, qbar, bars, *,
                   block_kv, tpp, num_stages, num_splits, window, rows_q, hpb, pk, nkv):
    b = lax.axis_index("b")
    hg = lax.axis_index("h")                                # group of hpb KV heads
    split = lax.axis_index("s")
    hd = q_smem.shape[1]
    ppb = block_kv // tpp                                   # pages per step
    length = len_ref[b]
    last = (length + block_kv - 1) // block_kv              # steps over [0, length)
    first = 0
    if window is not None:
        first = jnp.maximum(length - window, 0) // block_kv
    per_split = (last - first + num_splits - 1) // num_splits
    s0 = jnp.minimum(first + split * per_split, last)
    n_steps = jnp.minimum(s0 + per_split, last) - s0        # per head
    n_div = jnp.maximum(n_steps, 1)
    total = hpb * n_steps            # one pipelined loop over (head, step), head-major

    q_rows = hpb * rows_q
    q0 = pl.multiple_of((b * nkv + hg * hpb) * rows_q, 8)
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q0, q_rows)], q_smem.at[pl.ds(0, q_rows)], qbar)

    def issue(i, stage):
        j = i // n_div
        step = s0 + i % n_div
        col = pl.multiple_of((hg * hpb + j) * hd, 64)
        for jj in range(ppb):
            pidx = jnp.minimum(step * ppb + jj, pk - 1)
            page = pages_ref[b, pidx]
            dst = pl.ds(jj * tpp, tpp)
            plgpu.copy_gmem_to_smem(kv_ref.at[page, pl.ds(0, tpp), pl.ds(col, hd)],
                                    k_smem.at[stage, dst], bars.at[stage])
            plgpu.copy_gmem_to_smem(kv_ref.at[page, pl.ds(tpp, tpp), pl.ds(col, hd)],
                                    v_smem.at[stage, dst], bars.at[stage])

    for i in range(num_stages):
        @pl.when(i < total)
        def _prologue(i=i):
            issue(i, i)
    plgpu.barrier_wait(qbar)

    rows = q_smem.shape[0]
    m_i = plgpu.layout_cast(jnp.full((rows,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((rows, hd), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    # Row r of the tile is a query row of head r // rows_q: a step of head j scores
    # every row against head j's keys and keeps only head j's rows (the others get
    # p = 0 and alpha = 1, so their state is untouched).
    row_head = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 0,
                                      layout=plgpu.Layout.WGMMA) // rows_q

    def step_body(i, carry):
        acc, m_i, l_i = carry
        stage = lax.rem(i, num_stages)
        j = i // n_div
        step = s0 + i % n_div
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
        if hpb > 1:
            live = live & (row_head == j)
        s = jnp.where(live, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        # P goes through SMEM: a wgmma operand (the register form is not interpretable).
        p_smem[...] = p.astype(p_smem.dtype)

        # A step past the context's end (or before the window) holds stale tokens: the
        # rest of the last page, pages the request holds for later, the null page. Their
        # p is exactly 0, but 0 * NaN is NaN: zero their V rows, as the reference does.
        edge = (step + 1) * block_kv > length
        if window is not None:
            edge = edge | (step * block_kv < length - window)

        @pl.when(edge)
        def _mask_v():
            v_pos = step * block_kv + plgpu.broadcasted_iota(
                jnp.int32, (block_kv, hd), 0, layout=plgpu.Layout.WGMMA)
            v_live = v_pos < length
            if window is not None:
                v_live = v_live & (v_pos >= length - window)
            v_tile = v_smem.at[stage]
            v_tile[...] = jnp.where(v_live, v_tile[...], jnp.zeros((), v_tile.dtype))
        plgpu.commit_smem()

        def pv_scope(pv_ref):
            plgpu.wgmma(pv_ref, p_smem, v_smem.at[stage])
            plgpu.wgmma_wait(0)
            return pv_ref[...]
        acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((rows, hd), jnp.float32))

        @pl.when(i + num_stages < total)
        def _refill():
            issue(i + num_stages, stage)
        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, total, step_body, (acc, m_i, l_i))

    o_smem[...] = acc
    ml_smem[0] = m_i
    ml_smem[1] = l_i
    plgpu.commit_smem()
    blk = (b * (nkv // hpb) + hg) * num_splits + split
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, q_rows)], o_ref.at[blk])
    plgpu.copy_smem_to_gmem(ml_smem.at[0, pl.ds(0, q_rows)], m_ref.at[blk])
    plgpu.copy_smem_to_gmem(ml_smem.at[1, pl.ds(0, q_rows)], l_ref.at[blk])
    plgpu.wait_smem_to_gmem(0)


def _decode_unsupported(layout: KVLayout, dtype, block_kv: int) -> str | None:
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
    "bsz", "nkv", "block_kv", "tpp", "num_stages", "num_splits", "window", "rows_q", "hpb",
    "interpret"))
def _decode_call(qs, kv, kv_pages, lengths, *, bsz, nkv, block_kv, tpp, num_stages, num_splits,
                 window, rows_q, hpb, interpret):
    hd = qs.shape[-1]
    dt = kv.dtype
    bkv = block_kv
    nblk = bsz * (nkv // hpb) * num_splits
    body = functools.partial(_decode_kernel, block_kv=bkv, tpp=tpp, num_stages=num_stages,
                             num_splits=num_splits, window=window, rows_q=rows_q, hpb=hpb,
                             pk=kv_pages.shape[1], nkv=nkv)
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((nblk, hpb * rows_q, hd), jnp.float32),
                  jax.ShapeDtypeStruct((nblk, hpb * rows_q), jnp.float32),
                  jax.ShapeDtypeStruct((nblk, hpb * rows_q), jnp.float32)),
        grid=(bsz, nkv // hpb, num_splits),
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


TARGET_BLOCKS = 128     # about one block per SM (132 on the H100): see `decode_tiling`


def decode_tiling(bsz: int, nkv: int, rows_q: int, max_steps: int,
                  heads_per_block: int | None = None) -> tuple[int, int]:
    """(KV heads per block, context splits) for ~TARGET_BLOCKS blocks.

    A block's KV heads have their query rows stacked in the 64 rows of one wgmma (the
    H100's narrowest), so small G (MHA: 1) costs no more tensor-core work per head and
    the block runs one long pipelined loop. Default: the most heads (a divisor of n_kv
    whose rows fit 64) that still give TARGET_BLOCKS blocks, then context splits only
    if one head per block is not enough; `heads_per_block` fixes the heads instead.
    Measured on the H100 (benchmarks/PERF.md, decode attention): long blocks beat many short ones,
    and heads beat splits, which cost a merge (Llama-7B B=1 ctx 4096: 1 head x 4 splits
    29.8 us, 8 heads x 32 splits 36.3 us, both 128 blocks)."""
    fits = [d for d in range(1, min(nkv, 64 // rows_q) + 1) if nkv % d == 0]
    if heads_per_block:
        if heads_per_block not in fits:
            raise ValueError(f"heads_per_block {heads_per_block}: must divide {nkv} KV heads "
                             f"and stack at most 64 query rows ({rows_q} each)")
        hpb = heads_per_block
    else:
        hpb = max([d for d in fits if bsz * (nkv // d) >= TARGET_BLOCKS] or [1])
    splits = max(1, min(max_steps, -(-TARGET_BLOCKS // (bsz * (nkv // hpb)))))
    return hpb, splits


def decode_attention(q: jax.Array, layer: jax.Array, kv_pages: jax.Array, lengths: jax.Array,
                     layout: KVLayout, sliding_window: int | None = None, *,
                     block_kv: int | None = None, num_stages: int | None = None,
                     num_splits: int | None = None, heads_per_block: int | None = None,
                     interpret=None) -> jax.Array:
    """q: [B, n_heads, hd]; layer: [P, page_size, H]; kv_pages: [B, Pk]; lengths: [B].

    Returns [B, n_heads, hd] float32. See `decode_attention_reference`. The tiling
    (block_kv, num_stages, num_splits, heads_per_block: a divisor of n_kv whose query
    rows fit 64) defaults to `decode_tiling`'s choice.
    """
    bsz, nq, hd = q.shape
    nkv, tpp = layout.num_kv_heads, layout.tokens_per_page
    pk = kv_pages.shape[1]
    # 128-token steps in two stages beat 64 in four at every shape swept on the H100.
    bkv = block_kv or max(128, tpp)
    num_stages = num_stages or (2 if bkv >= 128 else 4)
    g = nq // nkv
    rows_q = -(-g // 8) * 8
    why = _decode_unsupported(layout, layer.dtype, bkv)
    if rows_q > 64:
        why = f"{g} query heads per KV head (at most 64)"
    if why:
        _fallback(f"decode attention: {why}")
        return attn_ref.decode_attention_reference(q, layer, kv_pages, lengths, layout,
                                                   sliding_window)
    if interpret is None:
        interpret = default_interpret()
    max_steps = -(-pk * tpp // bkv)
    hpb, splits = decode_tiling(bsz, nkv, rows_q, max_steps, heads_per_block)
    num_splits = num_splits or splits
    groups = nkv // hpb
    dt = layer.dtype
    # Fold the softmax scale and log2(e) into q; pad each KV head's G query rows to 8.
    qs = (q.astype(jnp.float32) * (hd ** -0.5 * _LOG2E)).astype(dt).reshape(bsz, nkv, g, hd)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, rows_q - g), (0, 0))).reshape(bsz * nkv * rows_q, hd)
    kv_rows = layout.page_elems // layout.kv_size
    kv = layer.reshape(layer.shape[0], kv_rows, layout.kv_size)     # free view
    o, m, l = _decode_call(qs, kv, kv_pages.astype(jnp.int32), lengths.astype(jnp.int32),
                           bsz=bsz, nkv=nkv, block_kv=bkv, tpp=tpp, num_stages=num_stages,
                           num_splits=num_splits, window=sliding_window, rows_q=rows_q,
                           hpb=hpb, interpret=interpret)
    # [block = (b, group, split), head in group, row] -> [b, KV head, split, row]
    o = o.reshape(bsz, groups, num_splits, hpb, rows_q, hd).transpose(0, 1, 3, 2, 4, 5)
    o = o.reshape(bsz, nkv, num_splits, rows_q, hd)[:, :, :, :g]
    l = l.reshape(bsz, groups, num_splits, hpb, rows_q).transpose(0, 1, 3, 2, 4)
    l = l.reshape(bsz, nkv, num_splits, rows_q)[:, :, :, :g]
    if num_splits == 1:
        return (o[:, :, 0] / l[:, :, 0, :, None]).reshape(bsz, nq, hd)
    # Merge the splits (flash-decoding): weights exp2(m_j - max m).
    m = m.reshape(bsz, groups, num_splits, hpb, rows_q).transpose(0, 1, 3, 2, 4)
    m = m.reshape(bsz, nkv, num_splits, rows_q)[:, :, :, :g]
    wgt = jnp.exp2(m - m.max(axis=2, keepdims=True))
    out = (o * wgt[..., None]).sum(axis=2) / (l * wgt).sum(axis=2)[..., None]
    return out.reshape(bsz, nq, hd)
