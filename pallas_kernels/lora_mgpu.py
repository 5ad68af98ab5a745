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

Rows move by TMA in groups of 8 rank rows (one row-tile of a wgmma operand),
read in the view of the pool in which the matrix's rank rows are rows
(`slora_jax.pool.matrix_form`): `[*, W]` for a flat matrix whose width W
divides H, `[*, C]` for a chunked one (an MLP matrix, C = gcd(W, H)), where
each column chunk is its own run of rank rows. `PoolLayout.adapter_offsets`
starts every matrix 8-aligned in that view (and pads a chunk's rank rows to
8), so a slot of rank r reads exactly ceil(r/8) groups per chunk. This needs
`page_size * H / C % 8 == 0`, so that a group never straddles a page. Copies of
groups past the rank are skipped (their row index points past the pool, where
TMA would fill zeros without reading memory).

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

Widths the kernels serve: any W with C % 64 == 0 (C = W for a flat matrix,
gcd(W, H) for a chunked one), on both sides: q/o (W = H), k/v (W = kv_size),
gate/up B and the down A^T (W = F). Others (and pool dtypes other than bf16/f16)
use the reference and say so once in the log.
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
from slora_jax.pool import matrix_form

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


def _group_rows(slot_pages, offset, rank, item_slot, *, num_groups, chunks, per, page_size,
                num_rows):
    """Row (in the width-C view) of each work item's 8-row groups, per column chunk:
    [W, chunks, num_groups]; past the slot's rank, `num_rows` (a row past the pool).
    `per`: view rows per pool row (H // C)."""
    s_max = slot_pages.shape[0]
    slot = jnp.minimum(item_slot, s_max - 1)
    off = offset[slot] * per                              # view rows, 8-aligned
    r = jnp.where(item_slot < s_max, rank[slot], 0)
    need = (r + GROUP - 1) // GROUP
    stride = need * GROUP if chunks > 1 else jnp.zeros_like(need)   # rank rows per chunk
    g = jnp.arange(num_groups, dtype=jnp.int32)
    c = jnp.arange(chunks, dtype=jnp.int32)
    srow = off[:, None, None] + c[None, :, None] * stride[:, None, None] + g[None, None, :] * GROUP
    ps = page_size * per
    pidx = jnp.minimum(srow // ps, slot_pages.shape[1] - 1)
    page = jnp.take_along_axis(slot_pages[slot], pidx.reshape(pidx.shape[0], -1),
                               axis=1).reshape(srow.shape)
    live = g[None, None, :] < need[:, None, None]
    return jnp.where(live, page * ps + srow % ps, num_rows).astype(jnp.int32)


def _pad_rows(idx: jax.Array, multiple: int) -> jax.Array:
    """Pad a row-index vector to a multiple of `multiple` (a TMA tile of rows)."""
    n = idx.shape[0]
    return jnp.pad(idx, (0, _round_up(n, multiple) - n))


# --- shrink kernel ------------------------------------------------------------------

def _shrink_kernel(grp_ref, tile_ref, lo_ref, hi_ref, x_ref, rows_ref, out_ref, a_smem, x_smem,
                   o_smem, bars, *, num_groups, block_tokens, block_k, num_k, num_stages,
                   num_rows, chunk_width, predicate):
    w = lax.axis_index("w")
    split = lax.axis_index("s")

    @pl.when(hi_ref[w] > lo_ref[w])
    def _item():
        tok0 = pl.multiple_of(tile_ref[w] * block_tokens, block_tokens)
        chunked = grp_ref.shape[1] > 1
        grp0 = [pl.multiple_of(grp_ref[w, 0, g], GROUP) for g in range(num_groups)]
        k_base = split * (num_k * block_k)

        def issue(ks, stage):
            k0 = pl.multiple_of(k_base + ks * block_k, block_k)
            if chunked:     # the chunk's own run of rank rows, at column k0 % C
                ch = k0 // chunk_width
                col = pl.multiple_of(k0 - ch * chunk_width, block_k)
                grp = [pl.multiple_of(grp_ref[w, ch, g], GROUP) for g in range(num_groups)]
            else:
                col, grp = k0, grp0
            for g in range(num_groups):
                plgpu.copy_gmem_to_smem(rows_ref.at[pl.ds(grp[g], GROUP), pl.ds(col, block_k)],
                                        a_smem.at[stage, pl.ds(g * GROUP, GROUP)],
                                        bars.at[stage], **_copy_if(predicate, grp0[g] < num_rows))
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
    "num_groups", "block_tokens", "block_k", "num_stages", "num_splits", "chunk_width",
    "interpret"))
def _shrink_call(group_rows, item_tile, item_lo, item_hi, x_sorted, rows_c, *, num_groups,
                 block_tokens, block_k, num_stages, num_splits, chunk_width, interpret):
    w_max = group_rows.shape[0]
    num_k = x_sorted.shape[1] // (block_k * num_splits)
    m = num_groups * GROUP
    dt = rows_c.dtype
    body = functools.partial(_shrink_kernel, num_groups=num_groups, block_tokens=block_tokens,
                             block_k=block_k, num_k=num_k, num_stages=num_stages,
                             num_rows=rows_c.shape[0], chunk_width=chunk_width,
                             predicate=not interpret)
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
    )(group_rows, item_tile, item_lo, item_hi, x_sorted, rows_c)


def _num_groups(max_rank: int) -> int:
    """8-row groups of the wgmma M (shrink) / K (expand) side: a multiple of 8 (64 rows)."""
    return _round_up(-(-max_rank // GROUP), 8)


def lora_shrink(x: jax.Array, rows: jax.Array, slot_pages: jax.Array, a_offset: jax.Array,
                rank: jax.Array, token_slot: jax.Array, *, max_rank: int, page_size: int,
                **kw) -> jax.Array:
    """xa[t] = x[t] · A_{slot(t)}: x [T, in], rows [N, H] -> [T, max_rank] float32.

    See `pallas_kernels.lora.lora_shrink_reference` for the contract; offsets must be
    8-aligned in the matrix's view, as `PoolLayout.adapter_offsets` places them.
    Keywords as `lora_shrink_multi`.
    """
    return lora_shrink_multi(x, rows, slot_pages, a_offset[:, None], rank[:, None], token_slot,
                             max_rank=max_rank, page_size=page_size, **kw)[0]


def lora_shrink_multi(x: jax.Array, rows: jax.Array, slot_pages: jax.Array,
                      a_offsets: jax.Array, ranks: jax.Array, token_slot: jax.Array, *,
                      max_rank: int, page_size: int, block_tokens: int | None = None,
                      block_k: int | None = None, num_stages: int | None = None,
                      num_splits: int | None = None, plan: dict | None = None,
                      interpret=None) -> jax.Array:
    """The shrinks of M modules that read the same x (q/k/v; gate/up) in one launch.

    a_offsets, ranks: [S, M]. Returns [M, T, max_rank] float32. Module m's rank rows
    start at row m·ceil(max_rank/8)·8 of each work item's wgmma tile, so the M
    matrices cost one pass over x and one launch. `plan`, if given, is
    `plan_batch(token_slot, S, block_tokens)` for the same block_tokens.
    """
    t, k = x.shape
    n_rows, h = rows.shape
    s, n_mod = a_offsets.shape
    c, chunks = matrix_form(k, h)
    bt = block_tokens or pick_block_tokens(t, s)
    per_mod = -(-max_rank // GROUP)                      # groups of one module
    num_groups = _round_up(n_mod * per_mod, 8)            # wgmma M: a multiple of 64 rows
    m = num_groups * GROUP
    bk = block_k or next((b for b in (256, 128, 64)
                          if (m + bt) * b * 2 <= STAGE_BYTES and c % b == 0), 64)
    why = _unsupported(k, h, c, page_size, bk, rows.dtype)
    if why:
        _fallback(f"shrink in={k}, H={h}: {why}")
        return jnp.stack([lora_ref.lora_shrink_reference(
            x, rows, slot_pages, a_offsets[:, j], ranks[:, j], token_slot, max_rank=max_rank,
            page_size=page_size) for j in range(n_mod)])
    if interpret is None:
        interpret = default_interpret()
    per = h // c
    rows_c = rows.reshape(n_rows * per, c)                  # free view: rank rows are rows
    plan = plan if plan is not None else plan_batch(token_slot, s, bt)
    w_max = plan["item_tile"].shape[0]
    splits = num_splits or _splits(w_max, k // bk)
    stages = num_stages or max(2, min(4, SMEM_BYTES // ((m + bt) * bk * 2), k // bk // splits))
    hi = jnp.where(plan["item_slot"] < s, plan["item_hi"], plan["item_lo"])   # no-adapter: skip
    grp = jnp.concatenate([_group_rows(
        slot_pages, a_offsets[:, j], ranks[:, j], plan["item_slot"], num_groups=per_mod,
        chunks=chunks, per=per, page_size=page_size, num_rows=rows_c.shape[0])
        for j in range(n_mod)], axis=-1)
    grp = jnp.pad(grp, ((0, 0), (0, 0), (0, num_groups - grp.shape[-1])),
                  constant_values=rows_c.shape[0])
    x_sorted = x.astype(rows.dtype)[_pad_rows(plan["order"], 8)]
    out = _shrink_call(grp, plan["item_tile"], plan["item_lo"], hi, x_sorted, rows_c,
                       num_groups=num_groups, block_tokens=bt, block_k=bk, num_stages=stages,
                       num_splits=splits, chunk_width=c, interpret=interpret)  # [splits, W, M, bt]
    # Each token's column, each module's rank rows from 0, summed over the splits.
    key = plan["key"]
    sl = jnp.minimum(key, s - 1)
    pos = plan["where"]
    item = plan["pos_item"][pos]
    i = jnp.arange(max_rank, dtype=jnp.int32)
    j = jnp.arange(n_mod, dtype=jnp.int32)
    row = j[:, None, None] * (per_mod * GROUP) + i[None, None, :]               # [M, 1, R]
    vals = out[:, item[None, :, None], row, (pos % bt)[None, :, None]].sum(0)   # [M, T, R]
    keep = (key < s)[None, :, None] & (i[None, None, :] < ranks[sl].T[:, :, None])
    return jnp.where(keep, vals, 0.0)


def _unsupported(width, h, c, page_size, block, dtype) -> str | None:
    if width > h and c == width:
        return "width is a multiple of the row width H (rank rows span pool rows)"
    if c % 64:
        return f"column chunk {c} (gcd of the width and H) is not a multiple of 64"
    if c % block or block % 64:
        return f"column chunk {c} is not a multiple of the block {block} (a multiple of 64)"
    if (page_size * (h // c)) % GROUP:
        return f"page_size {page_size} rows do not hold a multiple of {GROUP} rank rows"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"pool dtype {jnp.dtype(dtype)} is not 16-bit"
    return None


# --- expand kernel ------------------------------------------------------------------

def _expand_kernel(grp_ref, tile_ref, lo_ref, hi_ref, order_ref, xs_ref, rows_ref, out_ref,
                   xs_smem, b_smem, t_smem, o_smem, xbar, bars, *, num_groups, block_tokens,
                   block_n, num_n, num_stages, num_rows, chunk_width, num_splits, width,
                   predicate):
    w = lax.axis_index("w")
    mod = lax.axis_index("s") // num_splits      # the module (of those fused) of this block
    split = lax.axis_index("s") % num_splits
    lo, hi = lo_ref[w], hi_ref[w]

    @pl.when(hi > lo)
    def _item():
        tok0 = pl.multiple_of(tile_ref[w] * block_tokens, block_tokens)
        first = order_ref[lo]
        whole = (hi - lo == block_tokens) & (order_ref[hi - 1] - first == block_tokens - 1)
        chunked = grp_ref.shape[2] > 1
        grp0 = [pl.multiple_of(grp_ref[w, mod, 0, g], GROUP) for g in range(num_groups)]
        # K in 64-row halves; a half past the slot's last group is skipped whole. In
        # a half in use, groups past the rank are copied from past the pool: zeros,
        # which the wgmma needs (stale SMEM may hold NaN, and NaN * 0 is NaN).
        half_used = [grp0[kh * 8] < num_rows for kh in range(num_groups // 8)]
        n_base = split * (num_n * block_n)
        plgpu.copy_gmem_to_smem(xs_ref.at[mod, pl.ds(tok0, block_tokens)], xs_smem, xbar)

        def issue(ns, stage):
            n0 = pl.multiple_of(n_base + ns * block_n, block_n)
            if chunked:     # the chunk's own run of rank rows, at column n0 % C
                ch = n0 // chunk_width
                col = pl.multiple_of(n0 - ch * chunk_width, block_n)
                grp = [pl.multiple_of(grp_ref[w, mod, ch, g], GROUP)
                       for g in range(num_groups)]
            else:
                col, grp = n0, grp0
            for g in range(num_groups):
                plgpu.copy_gmem_to_smem(rows_ref.at[pl.ds(grp[g], GROUP), pl.ds(col, block_n)],
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
            n0 = pl.multiple_of(mod * width + n_base + ns * block_n, block_n)   # out column

            # A whole tile of tokens that are consecutive in the batch (a prefill
            # segment: the sort is stable, so increasing) goes out in one copy; other
            # items store each token's row at its place.
            @pl.when(whole)
            def _store_tile():
                plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(first, block_tokens),
                                                           pl.ds(n0, block_n)])

            @pl.when(jnp.logical_not(whole))
            def _store_rows():
                @pl.loop(lo, hi)
                def _store_row(p):
                    plgpu.copy_smem_to_gmem(
                        o_smem.at[pl.ds(p - tok0, 1)],
                        out_ref.at[pl.ds(order_ref[p], 1), pl.ds(n0, block_n)])

        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "num_tokens", "num_groups", "block_tokens", "block_n", "num_stages", "num_splits",
    "width", "chunk_width", "interpret"))
def _expand_call(group_rows, item_tile, item_lo, item_hi, order, xs, rows_c, *, num_tokens,
                 num_groups, block_tokens, block_n, num_stages, num_splits, width, chunk_width,
                 interpret):
    w_max, n_mod = group_rows.shape[:2]
    k = xs.shape[2]
    num_n = width // (block_n * num_splits)
    dt = rows_c.dtype
    body = functools.partial(_expand_kernel, num_groups=num_groups, block_tokens=block_tokens,
                             block_n=block_n, num_n=num_n, num_stages=num_stages,
                             num_rows=rows_c.shape[0], chunk_width=chunk_width,
                             num_splits=num_splits, width=width, predicate=not interpret)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_tokens, n_mod * width), jnp.float32),
        grid=(w_max, n_mod * num_splits),
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
    )(group_rows, item_tile, item_lo, item_hi, order, xs, rows_c)


def lora_expand(xa: jax.Array, rows: jax.Array, slot_pages: jax.Array, b_offset: jax.Array,
                rank: jax.Array, scale: jax.Array, token_slot: jax.Array, *, out_features: int,
                page_size: int, **kw) -> jax.Array:
    """y[t] = scale_{slot(t)} · xa[t] · B_{slot(t)}: xa [T, R] f32 -> [T, out] float32.

    See `pallas_kernels.lora.lora_expand_reference` for the contract (offsets 8-aligned
    in the matrix's view, as `PoolLayout.adapter_offsets` places them). xa·scale is
    rounded to the pool dtype (bf16) for the tensor-core product. Keywords as
    `lora_expand_multi`.
    """
    return lora_expand_multi(xa[None], rows, slot_pages, b_offset[:, None], rank[:, None],
                             scale[:, None], token_slot, out_features=out_features,
                             page_size=page_size, **kw)


def lora_expand_multi(xa: jax.Array, rows: jax.Array, slot_pages: jax.Array,
                      b_offsets: jax.Array, ranks: jax.Array, scales: jax.Array,
                      token_slot: jax.Array, *, out_features: int, page_size: int,
                      block_tokens: int | None = None, block_n: int | None = None,
                      num_stages: int | None = None, num_splits: int | None = None,
                      plan: dict | None = None, interpret=None) -> jax.Array:
    """The expands of M modules of one output width in one launch.

    xa: [M, T, R] f32 (`lora_shrink_multi`); b_offsets, ranks, scales: [S, M].
    Returns [T, M · out_features] float32, module m in columns [m·out, (m+1)·out).
    """
    n_mod, t, max_rank = xa.shape
    n_rows, h = rows.shape
    s = slot_pages.shape[0]
    c, chunks = matrix_form(out_features, h)
    bt = block_tokens or pick_block_tokens(t, s)
    # K: a multiple of 64, since a wgmma's operands must share one swizzle (128 B).
    num_groups = _num_groups(max_rank)
    k = num_groups * GROUP
    want = min(out_features, 256 if k == 64 else 128, 16384 // bt)
    bn = block_n or next((b for b in (256, 128, 64) if b <= want and c % b == 0), 64)
    why = _unsupported(out_features, h, c, page_size, bn, rows.dtype)
    if why:
        _fallback(f"expand out={out_features}, H={h}: {why}")
        return jnp.concatenate([lora_ref.lora_expand_reference(
            xa[j], rows, slot_pages, b_offsets[:, j], ranks[:, j], scales[:, j], token_slot,
            out_features=out_features, page_size=page_size) for j in range(n_mod)], axis=1)
    if interpret is None:
        interpret = default_interpret()
    per = h // c
    rows_c = rows.reshape(n_rows * per, c)                  # free view: rank rows are rows
    plan = plan if plan is not None else plan_batch(token_slot, s, bt)
    w_max = plan["item_tile"].shape[0]
    splits = num_splits or _splits(w_max * n_mod, out_features // bn)
    stages = num_stages or max(2, min(4, SMEM_BYTES // (k * bn * 2),
                                      out_features // bn // splits))
    grp = jnp.stack([_group_rows(
        slot_pages, b_offsets[:, j], ranks[:, j], plan["item_slot"], num_groups=num_groups,
        chunks=chunks, per=per, page_size=page_size, num_rows=rows_c.shape[0])
        for j in range(n_mod)], axis=1)                                     # [W, M, chunks, G]
    # xs[m, p, i] = scale * xa[m, token(p), i] below the slot's rank; tokens with no
    # adapter get a zero row.
    order = _pad_rows(plan["order"], 8)
    key = jnp.where(jnp.arange(order.shape[0]) < t, plan["key"][order], s)
    sl = jnp.minimum(key, s - 1)
    i = jnp.arange(k, dtype=jnp.int32)[None, None, :]
    live = (key < s)[None, :, None] & (i < ranks[sl].T[:, :, None])
    vals = xa[:, order[:, None], jnp.minimum(i[0], max_rank - 1)] * scales[sl].T[:, :, None]
    xs = jnp.where(live, vals, 0.0).astype(rows.dtype)                     # [M, T8, K]
    return _expand_call(grp, plan["item_tile"], plan["item_lo"], plan["item_hi"],
                        plan["order"], xs, rows_c, num_tokens=t, num_groups=num_groups,
                        block_tokens=bt, block_n=bn, num_stages=stages, num_splits=splits,
                        width=out_features, chunk_width=c, interpret=interpret)
