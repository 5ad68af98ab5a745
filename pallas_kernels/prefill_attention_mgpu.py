"""Causal prefill attention over ragged prompts packed in one token array, as a
Pallas Mosaic GPU (Hopper: wgmma + TMA) kernel.

The contract is `paged_attention.prefill_attention_reference`: q [T, n_heads, hd],
k, v [T, n_kv, hd] (bf16 or f16; n_heads = G * n_kv), seq_ids and positions [T];
returns [T, n_heads, hd] float32. The packing convention of
`slora_jax.batching.prefill_batch` is relied upon, not checked: each prompt's
tokens are contiguous with positions 0..len-1, so the keys of a real token t
are exactly the tokens j with  lo[t] <= j <= t,  lo[t] = t - positions[t]
(and lo[t] >= t - window + 1 with a sliding window). seq_ids are not read.
Padding tokens (seq_id = num_requests, position 0, after the last prompt) are
each a segment of their own here: a padding token attends to itself only, so
its output is its own v row (finite; the reference would average all padding
tokens instead). Outputs for padding tokens are unspecified by the contract.

Kernel design (flash-attention 2, one warpgroup per block, as the decode kernel):
  * Grid (head, query tile): one block per (query tile of `block_q` = 64 rows,
    or 128, query head). Heads are the fastest grid axis so that the G heads
    sharing a KV head run side by side and read the same K/V tiles from L2.
    The G heads are *not* stacked in the wgmma rows (as the decode kernel
    does): prefill has query rows enough to fill 64-row tiles, and stacking
    would need a transposed copy of q in XLA and row -> token = row // G in
    every mask, for a K/V reuse that L2 mostly gives anyway. Query tiles are
    walked from the last to the first, so the longest causal rows start first
    and the short ones fill the tail.
  * Per block, the KV loop runs over tiles [min lo of its rows, its last row]:
    KV tiles wholly before every row's segment start (or window), and all
    tiles past the diagonal, are never loaded. The loop is split in three: a
    masked head (tiles that straddle some row's lo), an unmasked middle (tiles
    visible to every row: no iota, no select), a masked tail (the diagonal).
    The per-row bounds lo[t] come from GMEM by one 1-D TMA and are read into
    registers in the WGMMA row layout; the per-tile bounds (min and max of lo
    over the tile's rows) are scalars computed in XLA, read from GMEM.
  * K and V tiles are TMA-copied straight out of the packed [T, n_kv, hd] arrays
    (a strided [block_kv, hd] box per KV head, no transpose in XLA) into
    `num_stages` SMEM stages, one barrier per stage for K and one for V (QK^T
    starts as soon as K lands); a stage is refilled once its P @ V is done.
    The online softmax is float32 with exp2 (scale * log2 e applied to S in
    float32, not folded into a bf16 q); P goes through SMEM as the wgmma A
    operand; the running max starts at a finite -1e30 so a row whose whole KV
    tile is masked (a segment starting mid tile) never makes NaN.
  * Isolation: S is masked by a select, and in the masked tiles (the only ones
    holding keys some row must not see: another prompt's, or its own future)
    the V tile's non-finite values are set to 0 in SMEM before P @ V, since the
    0 of P times NaN would be NaN. A prompt's rows so never depend on another
    prompt's q/k/v; rows whose own keys are not finite are unspecified.
  * The output tile is written as float32 through SMEM straight into
    [T, n_heads, hd] by TMA. The K/V/P stages and the output tile live in two
    successive `run_scoped` regions, so they share SMEM: at hd 128 with the
    defaults (block_kv 64, 2 stages) a block takes ~92 KiB, two blocks per SM
    (one block's softmax overlaps the other's wgmmas).
T is padded in XLA to a multiple of lcm(block_q, block_kv) when it is not one
already (the padded rows attend to themselves only: zero K/V); no copy is made
when it is.

Unsupported cases (dtypes not one 16-bit type, hd not a multiple of 64 or
> 256, n_heads not a multiple of n_kv, block sizes the wgmma cannot take or
SMEM cannot hold, sliding_window < 1) log once and use the reference.
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

from pallas_kernels import attention_reference as attn_ref
from pallas_kernels.mgpu_common import (default_interpret, finite_or_zero, smem_transforms,
                                        warn_once)

_log = logging.getLogger(__name__)
_warned: set[str] = set()
_LOG2E = math.log2(math.e)
_M_INIT = -1e30          # finite, so that a fully masked tile never makes NaN


def _fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"prefill_attention_mgpu: {what}; using the jnp reference")


def _kv_steps(t0, tile_lo, tile_hi, block_q: int, block_kv: int):
    """KV steps (tiles of `block_kv` keys) of the query tile of rows [t0, t0 + block_q)
    whose rows t see keys [lo[t], t]; tile_lo / tile_hi: min / max of lo over the rows.

    Returns (first, u0, u1, last): the block runs steps [first, last), from the tile
    holding the earliest key of any row to the tile holding the last row (the
    diagonal); steps [u0, u1) are visible to every row (no mask), the others are
    masked. Works on traced and on plain integers.
    """
    first = tile_lo // block_kv
    last = (t0 + block_q - 1) // block_kv + 1
    u0 = jnp.clip((tile_hi + block_kv - 1) // block_kv, first, last)   # at/after every lo
    u1 = jnp.clip((t0 + 1) // block_kv, u0, last)                       # ends by row t0
    return first, u0, u1, last


def _kernel(q_ref, k_ref, v_ref, lo_ref, tlo_ref, thi_ref, o_ref, q_smem, lo_smem, qbar, kbars,
            vbars, *, block_q, block_kv, num_stages, group, scale, n_tiles):
    h = lax.axis_index("h")
    qi = n_tiles - 1 - lax.axis_index("q")       # last (longest) tiles first
    kvh = lax.div(h, jnp.array(group, h.dtype))
    hd = q_smem.shape[1]
    bq, bkv = block_q, block_kv
    t0 = pl.multiple_of(qi * bq, bq)

    first, u0, u1, last = _kv_steps(t0, tlo_ref[qi], thi_ref[qi], bq, bkv)
    n_steps = last - first

    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0, bq), h], q_smem, qbar)
    plgpu.copy_gmem_to_smem(lo_ref.at[pl.ds(t0, bq)], lo_smem, qbar)

    def loop_scope(k_smem, v_smem, p_smem):
        def issue(step, stage):
            j0 = pl.multiple_of(step * bkv, bkv)
            plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(j0, bkv), kvh], k_smem.at[stage],
                                    kbars.at[stage])
            plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(j0, bkv), kvh], v_smem.at[stage],
                                    vbars.at[stage])

        for i in range(num_stages):
            @pl.when(i < n_steps)
            def _prologue(i=i):
                issue(first + i, i)
        plgpu.barrier_wait(qbar)
        row_lo = plgpu.load(lo_smem, layout=plgpu.Layout.WGMMA.reduce(1))

        def body(i, carry, masked):
            acc, m_i, l_i = carry
            stage = lax.rem(i, num_stages)
            step = first + i
            plgpu.barrier_wait(kbars.at[stage])

            def qk_scope(qk_ref):
                plgpu.wgmma(qk_ref, q_smem, k_smem.at[stage].T)
                plgpu.wgmma_wait(0)
                return qk_ref[...]
            s = pl.run_scoped(qk_scope, plgpu.ACC((bq, bkv), jnp.float32)) * scale
            if masked:
                t = t0 + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0,
                                                layout=plgpu.Layout.WGMMA)
                j = step * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1,
                                                        layout=plgpu.Layout.WGMMA)
                live = (j <= t) & (j >= lax.broadcast_in_dim(row_lo, (bq, bkv), [0]))
                s = jnp.where(live, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            # P goes through SMEM: a wgmma operand (the register form is not interpretable).
            p_smem[...] = p.astype(p_smem.dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(vbars.at[stage])
            if masked:
                # A hidden key's p is exactly 0, but 0 * NaN is NaN: with the tile's V
                # made finite it adds exactly 0 (only rows that see it, its own prompt's,
                # can change). Unmasked tiles hold only keys every row sees.
                v_tile = v_smem.at[stage]
                v_tile[...] = finite_or_zero(v_tile[...])
                plgpu.commit_smem()

            def pv_scope(pv_ref):
                plgpu.wgmma(pv_ref, p_smem, v_smem.at[stage])
                plgpu.wgmma_wait(0)
                return pv_ref[...]
            acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((bq, hd), jnp.float32))

            @pl.when(i + num_stages < n_steps)
            def _refill():
                issue(step + num_stages, stage)
            return acc, m_new, l_i

        m_i = plgpu.layout_cast(jnp.full((bq,), _M_INIT, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((bq, hd), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        carry = (acc, m_i, l_i)
        masked_body = functools.partial(body, masked=True)
        carry = lax.fori_loop(0, u0 - first, masked_body, carry)
        carry = lax.fori_loop(u0 - first, u1 - first, functools.partial(body, masked=False),
                              carry)
        carry = lax.fori_loop(u1 - first, n_steps, masked_body, carry)
        acc, _, l_i = carry
        # Every row sees at least itself, so l_i > 0.
        return acc / lax.broadcast_in_dim(l_i, acc.shape, [0])

    dt = q_smem.dtype
    out = pl.run_scoped(
        loop_scope,
        plgpu.SMEM((num_stages, bkv, hd), dt, transforms=smem_transforms(hd, dt)),
        plgpu.SMEM((num_stages, bkv, hd), dt, transforms=smem_transforms(hd, dt)),
        plgpu.SMEM((bq, bkv), dt, transforms=smem_transforms(bkv, dt)))

    # The K/V/P stages are free again (every issued copy was waited for, every
    # wgmma finished): the output tile reuses their SMEM.
    def out_scope(o_smem):
        o_smem[...] = out
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(t0, bq), h])
        plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(out_scope,
                  plgpu.SMEM((bq, hd), jnp.float32, transforms=smem_transforms(hd, jnp.float32)))


_MAX_SMEM = 227 * 1024       # opt-in shared memory per block on the H100


def _smem_bytes(block_q: int, block_kv: int, num_stages: int, hd: int) -> int:
    """SMEM of one block: q and the row bounds, then the larger of the two scopes
    (K/V stages + P during the loop, the float32 output tile after it); buffers
    are 1 KiB aligned, plus the barriers and what Mosaic GPU reserves (~2 KiB)."""
    loop = 2 * num_stages * block_kv * hd * 2 + block_q * block_kv * 2
    return block_q * hd * 2 + 1024 + max(loop, block_q * hd * 4) + 3072


def _unsupported(q, k, v, window, block_q: int, block_kv: int,
                 num_stages: int) -> str | None:
    dts = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dts) != 1 or dts.pop() not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} are not one 16-bit type"
    t, nq, hd = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != hd:
        return f"k {k.shape} / v {v.shape} do not match q {q.shape}"
    if nq % k.shape[1]:
        return f"n_heads {nq} is not a multiple of n_kv {k.shape[1]}"
    if hd % 64 or hd > 256:
        return f"head_dim {hd} is not a multiple of 64 up to 256"
    if block_q not in (64, 128):
        return f"block_q {block_q} is not 64 or 128"
    if block_kv % 64 or block_kv > 256:
        return f"block_kv {block_kv} is not a multiple of 64 up to 256"
    if num_stages < 1:
        return f"num_stages {num_stages} < 1"
    if _smem_bytes(block_q, block_kv, num_stages, hd) > _MAX_SMEM:
        return (f"block_q {block_q} / block_kv {block_kv} / {num_stages} stages at head_dim "
                f"{hd} need more SMEM than a block has")
    if window is not None and window < 1:
        return f"sliding_window {window} < 1"
    return None


# Jitted with its static configuration: traced and lowered once per shape
# (Mosaic GPU lowering of each call costs seconds).
@functools.partial(jax.jit, static_argnames=(
    "window", "block_q", "block_kv", "num_stages", "interpret"))
def _prefill(q, k, v, positions, *, window, block_q, block_kv, num_stages, interpret):
    t, nq, hd = q.shape
    nkv = k.shape[1]
    tile = math.lcm(block_q, block_kv)
    t_pad = -(-t // tile) * tile
    pos = positions.astype(jnp.int32)
    if t_pad != t:
        # Padded rows get position 0: each attends to itself only (its zero K/V).
        pad = ((0, t_pad - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        pos = jnp.pad(pos, (0, t_pad - t))
    tok = jnp.arange(t_pad, dtype=jnp.int32)
    lo = jnp.clip(tok - pos, 0, tok)                 # segment start of each row
    if window is not None:
        lo = jnp.maximum(lo, tok - (window - 1))
    tiles = lo.reshape(t_pad // block_q, block_q)
    body = functools.partial(_kernel, block_q=block_q, block_kv=block_kv,
                             num_stages=num_stages, group=nq // nkv,
                             scale=hd ** -0.5 * _LOG2E, n_tiles=t_pad // block_q)
    dt = q.dtype
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t_pad, nq, hd), jnp.float32),
        grid=(nq, t_pad // block_q),
        grid_names=("h", "q"),
        kernel_name="mgpu_prefill_attention",
        scratch_types=[
            plgpu.SMEM((block_q, hd), dt, transforms=smem_transforms(hd, dt)),
            plgpu.SMEM((block_q,), jnp.int32),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=1, num_barriers=num_stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=num_stages),
        ],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v, lo, tiles.min(axis=1), tiles.max(axis=1))
    return out[:t] if t_pad != t else out


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, seq_ids: jax.Array,
                      positions: jax.Array, sliding_window: int | None = None, *,
                      block_q: int | None = None, block_kv: int | None = None,
                      num_stages: int | None = None, key_only_rows: int = 0,
                      interpret=None) -> jax.Array:
    """Packed causal prefill attention (see the module docstring and
    `prefill_attention_reference`). q: [T, n_heads, hd]; k, v: [T, n_kv, hd];
    seq_ids, positions: [T]. Returns [T, n_heads, hd] float32; rows of padding
    tokens are finite but unspecified. `seq_ids` is not read: the segments
    follow from `positions` (each prompt contiguous, positions from 0).
    `key_only_rows`: the first rows are keys for later rows only; their outputs are
    unspecified, and each is made a one-token segment so that its query costs one tile.
    """
    t, nq, hd = q.shape
    bq = block_q or 64
    bkv = block_kv or (64 if hd >= 128 else 128)
    ns = num_stages or 2
    why = _unsupported(q, k, v, sliding_window, bq, bkv, ns)
    if why:
        _fallback(why)
        return attn_ref.prefill_attention_reference(q, k, v, seq_ids, positions, sliding_window)
    if t == 0:
        return jnp.zeros((0, nq, hd), jnp.float32)
    if interpret is None:
        interpret = default_interpret()
    window = None if sliding_window is None else int(sliding_window)
    if key_only_rows:
        positions = positions.at[:key_only_rows].set(0)
    return _prefill(q, k, v, positions, window=window, block_q=bq, block_kv=bkv,
                    num_stages=ns, interpret=interpret)
