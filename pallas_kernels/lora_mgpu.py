"""Heterogeneous-batch LoRA (S-LoRA's MBGMV/MBGMM) as Pallas Mosaic GPU kernels.

The kernels behind `pallas_kernels.lora.lora_shrink/lora_expand` when
`backend="pallas"`: the contract of `lora_shrink_reference` and
`lora_expand_reference`, computed straight from the adapters' pool pages.

The batch plan (XLA, small int arrays, `plan_batch`): tokens are sorted by
adapter slot, the sorted token array is cut into aligned tiles of
`block_tokens`, and one *work item* is one (token tile, slot) pair for every
slot with tokens in that tile (as ragged_dot maps groups to blocks). A slot
whose tokens fit in one tile has its rows read once, whatever the batch; each
slot's rows are read only up to its own rank. The plan depends on token_slot
alone, so inside a jitted step XLA computes it once for every module and layer.

Rows move by TMA in groups of 8 stream rows (one row-tile of a wgmma operand).
A matrix at row offset `off` of its row stream is covered by the 8-aligned
groups from `off // 8` on, so at most 7 rows are read on either side of it: the
extra rows are finite pool data, either never read back (shrink) or multiplied
by zero columns (expand). This needs `page_size % 8 == 0`, so that a group
never straddles a page. Copies of groups past the matrix are skipped (their row
index points past the pool, where TMA would fill zeros without reading memory).

Shrink (x·A): work item (w, k-split) computes acc[stream rows, tokens] =
A_rows[:, k] · x_tile[:, k]^T over its share of K = in; XLA sums the splits and
picks each token's column from its slot's first rank row on.
Expand ((xa)·B): work item (w, n-split) computes out^T[n, tokens] = B_rows^T ·
xs_tile^T, where xs is xa scaled and shifted by XLA so that its column j
multiplies the j-th row of the slot's first group; the result is transposed
through SMEM and each token's row is stored by its own TMA copy, so there is
no un-sorting pass. Tokens are the wgmma N side (8 at decode): the M=64 minimum
falls on the rank rows (shrink) and the output features (expand), not on the
tokens.

Widths the kernels serve: shrink with in == H; expand with out dividing H (a
k/v B of width kv_size is read through the [N*H/W, W] view of the rows). Other
widths (an MLP B of width F, the down A^T of width F) use the reference and
say so once in the log.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import default_interpret, smem_transforms, warn_once
from pallas_kernels import lora as lora_ref

_log = logging.getLogger(__name__)
_warned: set[str] = set()

GROUP = 8               # stream rows per TMA copy: one 8-row tile of a wgmma operand
TARGET_BLOCKS = 4 * 132  # split work until about this many blocks (4 per H100 SM)
STAGE_BYTES = 40 << 10   # SMEM per pipeline stage we aim for
SMEM_BYTES = 110 << 10   # SMEM per block for the stages: two blocks fit on an SM
MAX_BLOCK_TOKENS = 32    # tokens per work item at most: 32 beat 64 and 128 in the Llama-7B e2e step


def _fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"lora_mgpu: {what}; using the jnp reference for this shape")


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _copy_if(predicate: bool, cond) -> dict:
    """Skip a copy on the GPU. The interpreter takes no predicate: there the copy
    runs, from a row past the pool, and TMA's zero fill gives the same result."""
    return {"predicate": cond} if predicate else {}


def _splits(items: int, max_splits: int) -> int:
    """Splits of K (shrink) or N (expand) per item: enough blocks to fill the GPU,
    a divisor of `max_splits` (the number of chunks)."""
    want = -(-TARGET_BLOCKS // items)
    return max(d for d in range(1, max_splits + 1) if max_splits % d == 0 and d <= max(want, 1))


# --- the batch plan (XLA) --------------------------------------------------------

def pick_block_tokens(num_tokens: int, num_slots: int) -> int:
    """Tokens per work item: 8 at decode (one token per request), up to MAX_BLOCK_TOKENS when
    slots hold many tokens (prefill)."""
    per_slot = max(1, num_tokens // max(num_slots, 1))
    return int(min(MAX_BLOCK_TOKENS, max(8, 1 << (per_slot - 1).bit_length())))


def num_items_bound(num_tokens: int, num_slots: int, block_tokens: int) -> int:
    """Static bound on work items: each tile, plus one per slot that starts mid-tile."""
    return -(-num_tokens // block_tokens) + min(num_slots + 1, num_tokens)


def plan_batch(token_slot: jax.Array, num_slots: int, block_tokens: int) -> dict:
    """Sort tokens by slot and list the (token tile, slot) work items.

    token_slot: [T] int32 (-1 = no adapter: those tokens form one more pseudo-slot
    `num_slots`, whose items write zero rows in the expand). Returns int32 arrays:
    order [T] (sorted position -> token), where [T] (token -> sorted position),
    key [T] (each token's slot, num_slots for none), item_slot/item_tile/item_lo/
    item_hi [W] (slot, tile, and the sorted positions [lo, hi) the item owns; hi ==
    lo for unused items) and pos_item [T] (the item owning each sorted position).
    """
    t = token_slot.shape[0]
    nseg = num_slots + 1
    bt = block_tokens
    key = jnp.where(token_slot >= 0, token_slot, num_slots).astype(jnp.int32)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    where = jnp.zeros((t,), jnp.int32).at[order].set(jnp.arange(t, dtype=jnp.int32))
    counts = (key[:, None] == jnp.arange(nseg, dtype=jnp.int32)[None, :]).sum(0,
                                                                             dtype=jnp.int32)
    ends = jnp.cumsum(counts, dtype=jnp.int32)
    starts = ends - counts
    first_tile = starts // bt
    n_items = jnp.where(counts > 0, (ends - 1) // bt - first_tile + 1, 0)
    item_end = jnp.cumsum(n_items, dtype=jnp.int32)
    item_base = item_end - n_items
    w = jnp.arange(num_items_bound(t, num_slots, bt), dtype=jnp.int32)
    slot = jnp.minimum(jnp.searchsorted(item_end, w, side="right", method="compare_all"),
                       nseg - 1).astype(jnp.int32)
    tile = first_tile[slot] + (w - item_base[slot])
    used = w < item_end[-1]
    lo = jnp.where(used, jnp.maximum(starts[slot], tile * bt), 0)
    hi = jnp.where(used, jnp.minimum(ends[slot], (tile + 1) * bt), 0)
    p = jnp.arange(t, dtype=jnp.int32)
    skey = key[order]
    pos_item = item_base[skey] + p // bt - first_tile[skey]
    return dict(order=order, where=where, key=key, item_slot=slot,
                item_tile=jnp.where(used, tile, 0), item_lo=lo, item_hi=hi, pos_item=pos_item)


def batch_plan(token_slot: jax.Array, num_slots: int) -> dict:
    """The plan `lora_shrink`/`lora_expand` build when given none (block_tokens by
    `pick_block_tokens`): build it once per step and pass it to every call."""
    bt = pick_block_tokens(token_slot.shape[0], num_slots)
    return plan_batch(token_slot, num_slots, bt)


def _group_rows(slot_pages, offset, rank, item_slot, *, num_groups, page_size, rows_per_row,
                num_rows):
    """Pool row (in the width-W row view) of each work item's 8-row groups; past the
    matrix, `num_rows` (a row past the pool)."""
    s_max = slot_pages.shape[0]
    slot = jnp.minimum(item_slot, s_max - 1)
    off = offset[slot] * rows_per_row                     # offset in W-rows
    r = jnp.where(item_slot < s_max, rank[slot], 0)       # W | H: a rank row is one W-row
    first = off // GROUP
    need = jnp.where(r > 0, (off + r - 1) // GROUP - first + 1, 0)
    g = jnp.arange(num_groups, dtype=jnp.int32)
    srow = (first[:, None] + g[None, :]) * GROUP
    ps = page_size * rows_per_row
    pidx = jnp.minimum(srow // ps, slot_pages.shape[1] - 1)
    page = jnp.take_along_axis(slot_pages[slot], pidx, axis=1)
    return jnp.where(g[None, :] < need[:, None], page * ps + srow % ps, num_rows).astype(jnp.int32)


def _pad_rows(idx: jax.Array, multiple: int) -> jax.Array:
    """Pad a row-index vector to a multiple of `multiple` (a TMA tile of rows)."""
    n = idx.shape[0]
    return jnp.pad(idx, (0, _round_up(n, multiple) - n))


# --- shrink kernel ------------------------------------------------------------------

def _shrink_kernel(grp_ref, tile_ref, lo_ref, hi_ref, x_ref, rows_ref, out_ref, a_smem, x_smem,
                   o_smem, bars, *, num_groups, block_tokens, block_k, num_k, num_stages,
                   num_rows, predicate):
    w = lax.axis_index("w")
    split = lax.axis_index("s")

    @pl.when(hi_ref[w] > lo_ref[w])
    def _item():
        tok0 = pl.multiple_of(tile_ref[w] * block_tokens, block_tokens)
        grp = [pl.multiple_of(grp_ref[w, g], GROUP) for g in range(num_groups)]
        k_base = split * (num_k * block_k)

        def issue(ks, stage):
            k0 = pl.multiple_of(k_base + ks * block_k, block_k)
            for g in range(num_groups):
                plgpu.copy_gmem_to_smem(rows_ref.at[pl.ds(grp[g], GROUP), pl.ds(k0, block_k)],
                                        a_smem.at[stage, pl.ds(g * GROUP, GROUP)],
                                        bars.at[stage], **_copy_if(predicate, grp[g] < num_rows))
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(tok0, block_tokens), pl.ds(k0, block_k)],
                                    x_smem.at[stage], bars.at[stage])

        for s in range(min(num_stages, num_k)):
            issue(s, s)

        def acc_scope(acc_ref):
            @pl.loop(0, num_k)
            def _k_loop(ks):
                stage = lax.rem(ks, num_stages)
                plgpu.barrier_wait(bars.at[stage])
                plgpu.wgmma(acc_ref, a_smem.at[stage], x_smem.at[stage].T)
                plgpu.wgmma_wait(0)

                @pl.when(ks + num_stages < num_k)
                def _refill():
                    issue(ks + num_stages, stage)
            return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((num_groups * GROUP, block_tokens),
                                                 jnp.float32))
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, w])
        plgpu.wait_smem_to_gmem(0)


# Jitted with its static configuration, so a kernel of one shape is traced and
# lowered once per step function, not once per layer and module: the layers are
# a Python loop, and Mosaic GPU lowering of each call costs seconds.
@functools.partial(jax.jit, static_argnames=(
    "num_groups", "block_tokens", "block_k", "num_stages", "num_splits", "interpret"))
def _shrink_call(group_rows, item_tile, item_lo, item_hi, x_sorted, rows, *, num_groups,
                 block_tokens, block_k, num_stages, num_splits, interpret):
    w_max = group_rows.shape[0]
    num_k = x_sorted.shape[1] // (block_k * num_splits)
    m = num_groups * GROUP
    dt = rows.dtype
    body = functools.partial(_shrink_kernel, num_groups=num_groups, block_tokens=block_tokens,
                             block_k=block_k, num_k=num_k, num_stages=num_stages,
                             num_rows=rows.shape[0], predicate=not interpret)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_splits, w_max, m, block_tokens), jnp.float32),
        grid=(w_max, num_splits),
        grid_names=("w", "s"),
        kernel_name="mgpu_lora_shrink",
        scratch_types=[
            plgpu.SMEM((num_stages, m, block_k), dt, transforms=smem_transforms(block_k, dt)),
            plgpu.SMEM((num_stages, block_tokens, block_k), dt,
                       transforms=smem_transforms(block_k, dt)),
            plgpu.SMEM((m, block_tokens), jnp.float32,
                       transforms=smem_transforms(block_tokens, jnp.float32)),
            plgpu.Barrier(num_arrivals=num_groups + 1, num_barriers=num_stages),
        ],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(group_rows, item_tile, item_lo, item_hi, x_sorted, rows)


def lora_shrink(x: jax.Array, rows: jax.Array, slot_pages: jax.Array, a_offset: jax.Array,
                rank: jax.Array, token_slot: jax.Array, *, max_rank: int, page_size: int,
                block_tokens: int | None = None, block_k: int | None = None,
                num_stages: int | None = None, num_splits: int | None = None,
                plan: dict | None = None, interpret=None) -> jax.Array:
    """xa[t] = x[t] · A_{slot(t)}: x [T, in], rows [N, H] -> [T, max_rank] float32.

    See `pallas_kernels.lora.lora_shrink_reference` for the contract. `plan`, if
    given, is `plan_batch(token_slot, S, block_tokens)` for the same block_tokens.
    """
    t, k = x.shape
    n_rows, h = rows.shape
    s = slot_pages.shape[0]
    bt = block_tokens or pick_block_tokens(t, s)
    num_groups = _round_up(-(-(max_rank + GROUP - 1) // GROUP), 8)   # M: a multiple of 64
    m = num_groups * GROUP
    bk = block_k or next((b for b in (256, 128, 64)
                          if (m + bt) * b * 2 <= STAGE_BYTES and k % b == 0), 64)
    why = _shrink_unsupported(k, h, page_size, bk, rows.dtype)
    if why:
        _fallback(f"shrink in={k}, H={h}: {why}")
        return lora_ref.lora_shrink_reference(x, rows, slot_pages, a_offset, rank, token_slot,
                                              max_rank=max_rank, page_size=page_size)
    if interpret is None:
        interpret = default_interpret()
    plan = plan if plan is not None else plan_batch(token_slot, s, bt)
    w_max = plan["item_tile"].shape[0]
    splits = num_splits or _splits(w_max, k // bk)
    stages = num_stages or max(2, min(4, SMEM_BYTES // ((m + bt) * bk * 2), k // bk // splits))
    hi = jnp.where(plan["item_slot"] < s, plan["item_hi"], plan["item_lo"])   # no-adapter: skip
    grp = _group_rows(slot_pages, a_offset, rank, plan["item_slot"], num_groups=num_groups,
                      page_size=page_size, rows_per_row=1, num_rows=n_rows)
    x_sorted = x.astype(rows.dtype)[_pad_rows(plan["order"], 8)]
    out = _shrink_call(grp, plan["item_tile"], plan["item_lo"], hi, x_sorted, rows,
                       num_groups=num_groups, block_tokens=bt, block_k=bk, num_stages=stages,
                       num_splits=splits, interpret=interpret)       # [splits, W, M, bt]
    # Each token's column, from its slot's first rank row on, summed over the splits.
    key = plan["key"]
    sl = jnp.minimum(key, s - 1)
    pos = plan["where"]
    item = plan["pos_item"][pos]
    i = jnp.arange(max_rank, dtype=jnp.int32)
    row = (a_offset[sl] % GROUP)[:, None] + i[None, :]
    vals = out[:, item[:, None], row, (pos % bt)[:, None]].sum(0)
    keep = (key < s)[:, None] & (i[None, :] < rank[sl][:, None])
    return jnp.where(keep, vals, 0.0)


def _shrink_unsupported(k, h, page_size, block_k, dtype) -> str | None:
    if k != h:
        return "input width is not the row width H"
    if page_size % GROUP:
        return f"page_size {page_size} is not a multiple of {GROUP}"
    if h % block_k or block_k % 64:
        return f"H is not a multiple of block_k={block_k} (a multiple of 64)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"pool dtype {jnp.dtype(dtype)} is not 16-bit"
    return None


# --- expand kernel ------------------------------------------------------------------

def _expand_kernel(grp_ref, tile_ref, lo_ref, hi_ref, order_ref, xs_ref, rows_ref, out_ref,
                   xs_smem, b_smem, t_smem, o_smem, xbar, bars, *, num_groups, block_tokens,
                   block_n, num_n, num_stages, num_rows, predicate):
    w = lax.axis_index("w")
    split = lax.axis_index("s")
    lo, hi = lo_ref[w], hi_ref[w]

    @pl.when(hi > lo)
    def _item():
        tok0 = pl.multiple_of(tile_ref[w] * block_tokens, block_tokens)
        grp = [pl.multiple_of(grp_ref[w, g], GROUP) for g in range(num_groups)]
        # K in 64-row halves; a half past the slot's last group is skipped whole. In
        # a half in use, groups past the matrix are copied from past the pool: zeros,
        # which the wgmma needs (stale SMEM may hold NaN, and NaN * 0 is NaN).
        half_used = [grp[kh * 8] < num_rows for kh in range(num_groups // 8)]
        n_base = split * (num_n * block_n)
        plgpu.copy_gmem_to_smem(xs_ref.at[pl.ds(tok0, block_tokens)], xs_smem, xbar)

        def issue(ns, stage):
            n0 = pl.multiple_of(n_base + ns * block_n, block_n)
            for g in range(num_groups):
                plgpu.copy_gmem_to_smem(rows_ref.at[pl.ds(grp[g], GROUP), pl.ds(n0, block_n)],
                                        b_smem.at[stage, pl.ds(g * GROUP, GROUP)],
                                        bars.at[stage], **_copy_if(predicate, half_used[g // 8]))

        for s in range(min(num_stages, num_n)):
            issue(s, s)
        plgpu.barrier_wait(xbar)

        @pl.loop(0, num_n)
        def _n_loop(ns):
            stage = lax.rem(ns, num_stages)
            plgpu.barrier_wait(bars.at[stage])

            def acc_scope(acc_ref):
                for kh in range(num_groups // 8):
                    ks = slice(kh * 64, (kh + 1) * 64)
                    pl.when(half_used[kh])(lambda ks=ks: plgpu.wgmma(
                        acc_ref, b_smem.at[stage, ks].T, xs_smem.at[:, ks].T))
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            acc = pl.run_scoped(acc_scope, plgpu.ACC((block_n, block_tokens), jnp.float32))

            @pl.when(ns + num_stages < num_n)
            def _refill():
                issue(ns + num_stages, stage)

            # Transpose through SMEM, [n, tok] -> [tok, n]: a token's row is contiguous.
            t_smem[...] = acc
            plgpu.commit_smem()
            acc_t = plgpu.load(t_smem.T, layout=plgpu.Layout.WG_STRIDED(
                (block_tokens, block_n), vec_size=1))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last chunk's rows are out
            o_smem[...] = acc_t
            plgpu.commit_smem()
            n0 = pl.multiple_of(n_base + ns * block_n, block_n)

            @pl.loop(lo, hi)
            def _store_row(p):
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(p - tok0, 1)],
                                        out_ref.at[pl.ds(order_ref[p], 1), pl.ds(n0, block_n)])

        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "num_tokens", "num_groups", "block_tokens", "block_n", "num_stages", "num_splits",
    "interpret"))
def _expand_call(group_rows, item_tile, item_lo, item_hi, order, xs, rows_w, *, num_tokens,
                 num_groups, block_tokens, block_n, num_stages, num_splits, interpret):
    w_max = group_rows.shape[0]
    k = xs.shape[1]
    width = rows_w.shape[1]
    num_n = width // (block_n * num_splits)
    dt = rows_w.dtype
    body = functools.partial(_expand_kernel, num_groups=num_groups, block_tokens=block_tokens,
                             block_n=block_n, num_n=num_n, num_stages=num_stages,
                             num_rows=rows_w.shape[0], predicate=not interpret)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_tokens, width), jnp.float32),
        grid=(w_max, num_splits),
        grid_names=("w", "s"),
        kernel_name="mgpu_lora_expand",
        scratch_types=[
            plgpu.SMEM((block_tokens, k), dt, transforms=smem_transforms(k, dt)),
            plgpu.SMEM((num_stages, k, block_n), dt, transforms=smem_transforms(block_n, dt)),
            plgpu.SMEM((block_n, block_tokens), jnp.float32),
            plgpu.SMEM((block_tokens, block_n), jnp.float32),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=num_groups, num_barriers=num_stages),
        ],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(group_rows, item_tile, item_lo, item_hi, order, xs, rows_w)


def lora_expand(xa: jax.Array, rows: jax.Array, slot_pages: jax.Array, b_offset: jax.Array,
                rank: jax.Array, scale: jax.Array, token_slot: jax.Array, *, out_features: int,
                page_size: int, block_tokens: int | None = None, block_n: int | None = None,
                num_stages: int | None = None, num_splits: int | None = None,
                plan: dict | None = None, interpret=None) -> jax.Array:
    """y[t] = scale_{slot(t)} · xa[t] · B_{slot(t)}: xa [T, R] f32 -> [T, out] float32.

    See `pallas_kernels.lora.lora_expand_reference` for the contract. xa·scale is
    rounded to the pool dtype (bf16) for the tensor-core product.
    """
    t, max_rank = xa.shape
    n_rows, h = rows.shape
    s = slot_pages.shape[0]
    bt = block_tokens or pick_block_tokens(t, s)
    # K: a multiple of 64, since a wgmma's operands must share one swizzle (128 B).
    num_groups = _round_up(-(-(max_rank + GROUP - 1) // GROUP), 8)
    k = num_groups * GROUP
    bn = block_n or min(out_features, 256 if k == 64 else 128, 16384 // bt)
    why = _expand_unsupported(out_features, h, page_size, bn, rows.dtype)
    if why:
        _fallback(f"expand out={out_features}, H={h}: {why}")
        return lora_ref.lora_expand_reference(xa, rows, slot_pages, b_offset, rank, scale,
                                              token_slot, out_features=out_features,
                                              page_size=page_size)
    if interpret is None:
        interpret = default_interpret()
    per_row = h // out_features                      # rank rows per pool row
    rows_w = rows.reshape(n_rows * per_row, out_features)   # free view: rows of width W
    plan = plan if plan is not None else plan_batch(token_slot, s, bt)
    w_max = plan["item_tile"].shape[0]
    splits = num_splits or _splits(w_max, out_features // bn)
    stages = num_stages or max(2, min(4, SMEM_BYTES // (k * bn * 2),
                                      out_features // bn // splits))
    grp = _group_rows(slot_pages, b_offset, rank, plan["item_slot"], num_groups=num_groups,
                      page_size=page_size, rows_per_row=per_row, num_rows=rows_w.shape[0])
    # xs[p, shift + i] = scale * xa[token(p), i]: column j of xs multiplies the j-th
    # row of the slot's first group; tokens with no adapter get a zero row.
    order = _pad_rows(plan["order"], 8)
    key = jnp.where(jnp.arange(order.shape[0]) < t, plan["key"][order], s)
    sl = jnp.minimum(key, s - 1)
    i = jnp.arange(k, dtype=jnp.int32)[None, :] - ((b_offset[sl] * per_row) % GROUP)[:, None]
    live = (key < s)[:, None] & (i >= 0) & (i < rank[sl][:, None])
    vals = xa[order[:, None], jnp.clip(i, 0, max_rank - 1)] * scale[sl][:, None]
    xs = jnp.where(live, vals, 0.0).astype(rows.dtype)
    return _expand_call(grp, plan["item_tile"], plan["item_lo"], plan["item_hi"],
                        plan["order"], xs, rows_w, num_tokens=t, num_groups=num_groups,
                        block_tokens=bt, block_n=bn, num_stages=stages, num_splits=splits,
                        interpret=interpret)


def _expand_unsupported(out_features, h, page_size, block_n, dtype) -> str | None:
    if out_features > h or h % out_features:
        return "output width does not divide the row width H"
    if (page_size * (h // out_features)) % GROUP:
        return f"page_size {page_size} rows do not hold a multiple of {GROUP} rank rows"
    if out_features % block_n or block_n % 64:
        return f"output width is not a multiple of block_n={block_n} (a multiple of 64)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"pool dtype {jnp.dtype(dtype)} is not 16-bit"
    return None
