"""Heterogeneous-batch LoRA (S-LoRA's MBGMV/MBGMM) as Pallas Mosaic GPU kernels.

The kernels behind `pallas_kernels.lora` when `backend="pallas"`: the contract
of `lora_shrink_reference` and `lora_expand_reference`, computed straight from
the adapters' pool pages.

The token plan (XLA, small int arrays, `plan_batch`): tokens are sorted by
adapter slot and the sorted array is cut into aligned tiles of `block_tokens`
(8 at decode); one *item* is one (token tile, slot) pair for every slot with
tokens in that tile (as ragged_dot maps groups to blocks).

Rows move by TMA in *groups* of 8 rank rows, read in the view of the pool in
which the matrix's rank rows are rows (`slora_jax.pool.matrix_form`: `[*, W]`
for a flat matrix whose width W divides H, `[*, C]` for a chunked one, C =
gcd(W, H), where each column chunk is its own run of rank rows).
`PoolLayout.adapter_offsets` starts every matrix 8-aligned in that view, so a
slot of rank r owns exactly ceil(r/8) groups per module and chunk. This needs
`page_size * H / C % 8 == 0`, so that a group never straddles a page.

*Packing* (`GroupPlan`): the groups of all items of a token tile are laid end to
end and cut into *chunks* of 8 groups, the 64 rows of one wgmma operand, so a
rank-16 slot fills a quarter of a chunk instead of padding its rows to 64, and
the bytes a block moves are rank rows of the batch, not padding:

- shrink (x·A), one launch for the M modules that read the same x (q/k/v,
  gate/up): a chunk computes out[64 rows, tile tokens] = rows · x_tile^T over
  its share of K = in (grid: tile x chunk lane x K split); each token later
  takes its own slot's rows from its own column. XLA sums the K splits.
- expand ((xa)·B), one launch per output width: a tile's chunks are the K of
  one product, out^T[n, tokens] = B_chunks^T · xs^T, where xs is the
  block-diagonal [tokens, 64] slice of scale·xa that gives each token only its
  own slot's rows (zeros elsewhere). A tile's output rows are finished in the
  block and stored, in sorted order, by one TMA copy per N step; XLA un-sorts
  them where it adds them to the base output.

Between the two, one XLA gather turns the shrink's chunks into the expand's xs
(`lora_apply_multi`), so a module group costs two launches and two small XLA
fusions per layer; the plan itself (sort, packing, pool row of every group)
depends on the step's slots only and is built once for all layers.

Widths the kernels serve: any W with C % 64 == 0 (C = W for a flat matrix,
gcd(W, H) for a chunked one), on both sides. Others (and pool dtypes other
than bf16/f16) use the reference and say so once in the log.
"""

from __future__ import annotations

import dataclasses
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

GROUP = 8               # rank rows per TMA copy: one 8-row tile of a wgmma operand
CHUNK = 8               # groups per chunk: the 64 rows of one wgmma operand
ROWS = GROUP * CHUNK
TARGET_BLOCKS = 4 * 132  # expand: split N until about this many blocks (4 per H100 SM)
SHRINK_BLOCKS = 132      # shrink: split K until about this many blocks
STAGE_BYTES = 40 << 10   # SMEM per pipeline stage we aim for
SMEM_BYTES = 110 << 10   # SMEM per block for the stages: two blocks fit on an SM
MAX_BLOCK_TOKENS = 32    # tokens per tile at most: 32 beat 64 and 128 in the Llama-7B e2e step


def _fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"lora_mgpu: {what}; using the jnp reference for this shape")


def _copy_if(predicate: bool, cond) -> dict:
    """Skip a copy on the GPU. The interpreter takes no predicate: there the copy
    runs, from a row past the pool, and TMA's zero fill gives the same result."""
    return {"predicate": cond} if predicate else {}


def _divisor_at_most(n: int, want: int) -> int:
    """The largest divisor of n that is <= max(want, 1)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(want, 1))


# --- the token plan (XLA) ----------------------------------------------------------

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


# --- packing (XLA, once per step and module group) ---------------------------------

def _pack(plan: dict, ranks: jax.Array, num_tiles: int):
    """Lay each tile's groups end to end: item w's module-m groups are the packed
    groups pos[w, m] .. pos[w, m] + groups[w, m] - 1, and tile t owns chunks
    starts[t] .. starts[t + 1] - 1. ranks: [S, M]. Items come in tile order."""
    s = ranks.shape[0]
    slot = plan["item_slot"]
    valid = (plan["item_hi"] > plan["item_lo"]) & (slot < s)
    r = jnp.where(valid[:, None], ranks[jnp.minimum(slot, s - 1)], 0)
    groups = ((r + GROUP - 1) // GROUP).astype(jnp.int32)                    # [W, M]
    per_item = groups.sum(1)
    tile = plan["item_tile"]
    per_tile = jnp.zeros((num_tiles,), jnp.int32).at[tile].add(per_item)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                              jnp.cumsum((per_tile + CHUNK - 1) // CHUNK, dtype=jnp.int32)])
    before_item = jnp.cumsum(per_item, dtype=jnp.int32) - per_item
    before_tile = jnp.cumsum(per_tile, dtype=jnp.int32) - per_tile
    first = starts[tile] * CHUNK + before_item - before_tile[tile]
    pos = first[:, None] + jnp.cumsum(groups, axis=1, dtype=jnp.int32) - groups
    return starts, pos, groups


def _width_groups(widths) -> dict:
    """{width: the modules of that width}, in order of first appearance: the modules one
    expand launch serves."""
    return {w: [j for j, v in enumerate(widths) if v == w] for w in dict.fromkeys(widths)}


def _chunks_bound(num_items: int, num_mod: int, max_groups: int, num_tiles: int) -> int:
    """Static bound on the chunks of a packing: sum over tiles of ceil(groups / 8)."""
    return (num_items * num_mod * max_groups + (CHUNK - 1) * num_tiles) // CHUNK + 1


def _packed_rows(slot_pages, offsets, ranks, plan, pos, groups, *, bound, chunks, per,
                 page_size, num_rows, max_groups):
    """Pool row (width-C view) of every packed group, per column chunk:
    [bound * 8, chunks]; `num_rows` (past the pool) where no group is packed."""
    rows = jnp.stack([_group_rows(slot_pages, offsets[:, j], ranks[:, j], plan["item_slot"],
                                  num_groups=max_groups, chunks=chunks, per=per,
                                  page_size=page_size, num_rows=num_rows)
                      for j in range(offsets.shape[1])], axis=1)     # [W, M, chunks, G]
    g = jnp.arange(max_groups, dtype=jnp.int32)
    idx = jnp.where(g < groups[:, :, None], pos[:, :, None] + g, bound * CHUNK)
    out = jnp.full((bound * CHUNK, chunks), num_rows, jnp.int32)
    return out.at[idx.reshape(-1)].set(rows.transpose(0, 1, 3, 2).reshape(-1, chunks),
                                       mode="drop")


def _static():
    return dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GroupPlan:
    """Everything the kernels of one module group need that does not depend on the
    layer: built once per step (`group_plan`) and used by every layer. A pytree: it
    can be passed into a jitted function."""
    t: int = _static()               # tokens
    bt: int = _static()              # tokens per tile
    num_tiles: int = _static()
    num_slots: int = _static()
    max_rank: int = _static()
    k_in: int = _static()            # shrink input width (None: no shrink part)
    widths: tuple = _static()        # output width of each module (): no expand part
    s_bound: int = _static()         # shrink chunks, static bound
    e_bound: int = _static()         # expand chunks per module, static bound
    plan: dict                       # the token plan (`plan_batch`)
    ranks: jax.Array                 # [S, M]
    scales: jax.Array                # [S, M]
    s_starts: jax.Array              # [NT + 1] first chunk of each tile
    s_pos: jax.Array                 # [W, M] packed group of each item's module group 0
    s_rows: jax.Array                # [s_bound * 8, chunks_a] pool row of each packed group
    e_starts: jax.Array              # [M, NT + 1]
    e_rows: tuple                    # per distinct width: [its M, e_bound * 8, chunks_b]
    e_item: jax.Array                # [M, e_bound * 8] item of each packed group (-1: none)
    e_group: jax.Array               # [M, e_bound * 8] its group within the item's module


def group_plan(plan: dict, slot_pages, a_offsets, b_offsets, ranks, scales, *, t, k_in,
               widths, h, page_size, max_rank, block_tokens, num_rows) -> GroupPlan:
    """The packing of one module group (see the module docstring). a_offsets,
    b_offsets, ranks, scales: [S, M]; widths: M output widths; num_rows: pool rows."""
    s, n_mod = ranks.shape
    bt = block_tokens
    nt = -(-t // bt)
    w_max = plan["item_tile"].shape[0]
    gmax = -(-max_rank // GROUP)
    s_bound, s_starts, s_pos, s_rows = 0, None, None, None
    if k_in is not None:
        ca, chunks_a = matrix_form(k_in, h)
        s_bound = _chunks_bound(w_max, n_mod, gmax, nt)
        s_starts, s_pos, s_groups = _pack(plan, ranks, nt)
        s_rows = _packed_rows(slot_pages, a_offsets, ranks, plan, s_pos, s_groups,
                              bound=s_bound, chunks=chunks_a, per=h // ca, page_size=page_size,
                              num_rows=num_rows * (h // ca), max_groups=gmax)
    e_bound = _chunks_bound(w_max, 1, gmax, nt)
    e_starts, e_rows, e_item, e_group = [], [], [], []
    g = jnp.arange(gmax, dtype=jnp.int32)
    w_ids = jnp.broadcast_to(jnp.arange(w_max, dtype=jnp.int32)[:, None], (w_max, gmax))
    for j, width in enumerate(widths):
        cb, chunks_b = matrix_form(width, h)
        st, pos, grp = _pack(plan, ranks[:, j:j + 1], nt)
        e_starts.append(st)
        e_rows.append(_packed_rows(slot_pages, b_offsets[:, j:j + 1], ranks[:, j:j + 1], plan,
                                   pos, grp, bound=e_bound, chunks=chunks_b, per=h // cb,
                                   page_size=page_size, num_rows=num_rows * (h // cb),
                                   max_groups=gmax))
        idx = jnp.where(g < grp, pos + g, e_bound * CHUNK).reshape(-1)
        e_item.append(jnp.full((e_bound * CHUNK,), -1, jnp.int32).at[idx].set(
            w_ids.reshape(-1), mode="drop"))
        e_group.append(jnp.full((e_bound * CHUNK,), -1, jnp.int32).at[idx].set(
            jnp.broadcast_to(g, (w_max, gmax)).reshape(-1), mode="drop"))
    return GroupPlan(t=t, bt=bt, num_tiles=nt, num_slots=s, max_rank=max_rank, k_in=k_in,
                     widths=tuple(widths), plan=plan, ranks=ranks, scales=scales,
                     s_bound=s_bound, s_starts=s_starts, s_pos=s_pos, s_rows=s_rows,
                     e_bound=e_bound, e_starts=jnp.stack(e_starts) if widths else None,
                     e_rows=tuple(jnp.stack([e_rows[j] for j in _width_groups(widths)[w]])
                                  for w in _width_groups(widths)), e_item=jnp.stack(e_item) if widths else None,
                     e_group=jnp.stack(e_group) if widths else None)

# --- the pipeline both kernels run ------------------------------------------------

def _fill(issue, stages, total):
    """Issue the first `stages` of `total` steps' copies."""
    for s in range(stages):
        pl.when(s < total)(functools.partial(issue, s, s))


def _step(step, total, stages, bars, issue, mma):
    """Step `step`: wait for its stage, multiply (`mma(stage)`), then refill the stage
    with the copies of step + stages."""
    stage = lax.rem(step, stages)
    plgpu.barrier_wait(bars.at[stage])
    mma(stage)
    plgpu.wgmma_wait(0)

    @pl.when(step + stages < total)
    def _refill():
        issue(step + stages, stage)


# --- shrink kernel ------------------------------------------------------------------

def _shrink_kernel(starts_ref, grp_ref, x_ref, rows_ref, out_ref, a_smem, x_smem, o_smem, bars,
                   *, bt, bk, nk, stages, lanes, chunk_width, num_rows, predicate):
    """Block (tile * lanes + lane, split): the tile's chunks lane, lane + lanes, ...,
    each over this split's nk K steps; one pipeline runs through all of them."""
    b = lax.axis_index("b")
    split = lax.axis_index("s")
    tile, lane = b // lanes, lax.rem(b, lanes)
    c0 = starts_ref[tile] + lane
    mine = (starts_ref[tile + 1] - c0 + lanes - 1) // lanes
    total = mine * nk
    tok0 = pl.multiple_of(tile * bt, bt)

    def issue(step, stage):
        j = step // nk
        k0 = (split * nk + step - j * nk) * bk
        ch = k0 // chunk_width
        col = pl.multiple_of(k0 - ch * chunk_width, bk)
        row0 = (c0 + j * lanes) * CHUNK
        for g in range(CHUNK):
            r = grp_ref[row0 + g, ch]
            plgpu.copy_gmem_to_smem(
                rows_ref.at[pl.ds(pl.multiple_of(r, GROUP), GROUP), pl.ds(col, bk)],
                a_smem.at[stage, pl.ds(g * GROUP, GROUP)], bars.at[stage],
                **_copy_if(predicate, r < num_rows))
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(tok0, bt), pl.ds(pl.multiple_of(k0, bk), bk)],
                                x_smem.at[stage], bars.at[stage])

    @pl.when(mine > 0)
    def _work():
        _fill(issue, stages, total)

        @pl.loop(0, mine)
        def _chunk(j):
            def acc_scope(acc_ref):
                @pl.loop(0, nk)
                def _k(ks):
                    _step(j * nk + ks, total, stages, bars, issue, lambda st: plgpu.wgmma(
                        acc_ref, a_smem.at[st], x_smem.at[st].T))
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((ROWS, bt), jnp.float32))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the last chunk is out
            o_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, c0 + j * lanes])

        plgpu.wait_smem_to_gmem(0)


# Jitted with its static configuration, so a kernel of one shape is traced and
# lowered once per step function, not once per layer and module: the layers are
# a Python loop, and Mosaic GPU lowering of each call costs seconds.
@functools.partial(jax.jit, static_argnames=(
    "bound", "bt", "bk", "stages", "splits", "lanes", "chunk_width", "interpret"))
def _shrink_call(starts, grp, x_sorted, rows_c, *, bound, bt, bk, stages, splits, lanes,
                 chunk_width, interpret):
    nt = starts.shape[0] - 1
    dt = rows_c.dtype
    body = functools.partial(_shrink_kernel, bt=bt, bk=bk, nk=x_sorted.shape[1] // (bk * splits),
                             stages=stages, lanes=lanes, chunk_width=chunk_width,
                             num_rows=rows_c.shape[0], predicate=not interpret)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((splits, bound, ROWS, bt), jnp.float32),
        grid=(nt * lanes, splits),
        grid_names=("b", "s"),
        kernel_name="mgpu_lora_shrink",
        scratch_types=[
            plgpu.SMEM((stages, ROWS, bk), dt, transforms=smem_transforms(bk, dt)),
            plgpu.SMEM((stages, bt, bk), dt, transforms=smem_transforms(bk, dt)),
            plgpu.SMEM((ROWS, bt), jnp.float32, transforms=smem_transforms(bt, jnp.float32)),
            plgpu.Barrier(num_arrivals=CHUNK + 1, num_barriers=stages),
        ],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(starts, grp, x_sorted, rows_c)


# --- expand kernel ------------------------------------------------------------------

def _expand_kernel(starts_ref, grp_ref, xs_ref, rows_ref, out_ref, b_smem, xs_smem, t_smem,
                   o_smem, bars, *, bt, bn, num_n, stages, splits, width, chunk_width):
    """Block (tile, module * splits + split): num_n N steps of bn columns, each the
    sum over the tile's chunks; one pipeline runs through all (N step, chunk)."""
    tile = lax.axis_index("t")
    mod = lax.axis_index("s") // splits
    split = lax.rem(lax.axis_index("s"), splits)
    c0 = starts_ref[mod, tile]
    nch = starts_ref[mod, tile + 1] - c0
    total = num_n * nch
    n_base = split * (num_n * bn)

    def issue(step, stage):
        ns = step // nch
        chunk = c0 + step - ns * nch
        n0 = n_base + ns * bn
        ch = n0 // chunk_width
        col = pl.multiple_of(n0 - ch * chunk_width, bn)
        for g in range(CHUNK):
            # Groups past the packing read from past the pool: TMA fills zeros, which
            # the product needs (stale SMEM may hold NaN, and NaN * 0 is NaN).
            r = grp_ref[mod, chunk * CHUNK + g, ch]
            plgpu.copy_gmem_to_smem(
                rows_ref.at[pl.ds(pl.multiple_of(r, GROUP), GROUP), pl.ds(col, bn)],
                b_smem.at[stage, pl.ds(g * GROUP, GROUP)], bars.at[stage])
        plgpu.copy_gmem_to_smem(xs_ref.at[mod, chunk], xs_smem.at[stage], bars.at[stage])

    _fill(issue, stages, total)

    @pl.loop(0, num_n)
    def _n(ns):
        def acc_scope(acc_ref):
            @pl.loop(0, nch)
            def _k(kc):
                _step(ns * nch + kc, total, stages, bars, issue, lambda st: plgpu.wgmma(
                    acc_ref, b_smem.at[st].T, xs_smem.at[st].T))
            return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bn, bt), jnp.float32))   # zeros: no chunk
        # Transpose through SMEM, [n, tok] -> [tok, n]: a token's row is contiguous.
        t_smem[...] = acc
        plgpu.commit_smem()
        acc_t = plgpu.load(t_smem.T, layout=plgpu.Layout.WG_STRIDED((bt, bn), vec_size=1))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)       # the last N step is out
        o_smem[...] = acc_t
        plgpu.commit_smem()
        n0 = pl.multiple_of(mod * width + n_base + ns * bn, bn)
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(tile * bt, bt), pl.ds(n0, bn)])

    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "bt", "bn", "stages", "splits", "width", "chunk_width", "interpret"))
def _expand_call(starts, grp, xs, rows_c, *, bt, bn, stages, splits, width, chunk_width,
                 interpret):
    n_mod, nt = starts.shape[0], starts.shape[1] - 1
    dt = rows_c.dtype
    body = functools.partial(_expand_kernel, bt=bt, bn=bn, num_n=width // (bn * splits),
                             stages=stages, splits=splits, width=width,
                             chunk_width=chunk_width)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((nt * bt, n_mod * width), jnp.float32),
        grid=(nt, n_mod * splits),
        grid_names=("t", "s"),
        kernel_name="mgpu_lora_expand",
        scratch_types=[
            plgpu.SMEM((stages, ROWS, bn), dt, transforms=smem_transforms(bn, dt)),
            plgpu.SMEM((stages, bt, ROWS), dt, transforms=smem_transforms(ROWS, dt)),
            plgpu.SMEM((bn, bt), jnp.float32),
            plgpu.SMEM((bt, bn), jnp.float32),
            plgpu.Barrier(num_arrivals=CHUNK + 1, num_barriers=stages),
        ],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(starts, grp, xs, rows_c)

# --- launches and the XLA between them ----------------------------------------------

def _block_k(c: int, bt: int) -> int:
    return next((b for b in (256, 128, 64) if (ROWS + bt) * b * 2 <= STAGE_BYTES and c % b == 0),
                64)


def _block_n(c: int, width: int, bt: int) -> int:
    return next((b for b in (256, 128, 64) if b <= min(width, 16384 // bt) and c % b == 0), 64)


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


def _why_not(k_in, widths, h, page_size, dtype, bt, block_k=None, block_n=None) -> str | None:
    """Why the kernels cannot serve this module group (None: they can)."""
    if k_in is not None:
        c, _ = matrix_form(k_in, h)
        why = _unsupported(k_in, h, c, page_size, block_k or _block_k(c, bt), dtype)
        if why:
            return f"shrink in={k_in}, H={h}: {why}"
    for w in widths:
        c, _ = matrix_form(w, h)
        why = _unsupported(w, h, c, page_size, block_n or _block_n(c, w, bt), dtype)
        if why:
            return f"expand out={w}, H={h}: {why}"
    return None


def _shrink_launch(gp: GroupPlan, x, rows, *, block_k=None, num_stages=None, num_splits=None,
                   num_lanes=None, interpret=None):
    """The shrink kernel over the plan's packing: [splits, s_bound, 64, bt] float32."""
    t, k = x.shape
    n_rows, h = rows.shape
    c, _ = matrix_form(k, h)
    bt, nt = gp.bt, gp.num_tiles
    bk = block_k or _block_k(c, bt)
    # Chunk lanes first (up to 4: a tile rarely has many more chunks), then K splits up
    # to about SHRINK_BLOCKS blocks: a split costs its partial sums' traffic, and a
    # block needs a few steps to keep its pipeline full (tune_lora.py sweeps).
    per_tile = -(-min(bt, gp.num_slots + 1) * gp.ranks.shape[1] * (-(-gp.max_rank // GROUP))
                 // CHUNK)
    lanes = num_lanes or max(1, min(4, per_tile))
    splits = num_splits or _divisor_at_most(k // bk, -(-SHRINK_BLOCKS // (nt * lanes)))
    stage = (ROWS + bt) * bk * 2
    stages = num_stages or max(2, min(4, (SMEM_BYTES - ROWS * bt * 4) // stage))
    order = jnp.pad(gp.plan["order"], (0, nt * bt - t))
    return _shrink_call(gp.s_starts, gp.s_rows, x.astype(rows.dtype)[order],
                        rows.reshape(n_rows * (h // c), c), bound=gp.s_bound, bt=bt, bk=bk,
                        stages=stages, splits=splits, lanes=lanes, chunk_width=c,
                        interpret=default_interpret() if interpret is None else interpret)


def _expand_launch(gp: GroupPlan, xs, rows, mods: list[int], width: int, *, block_n=None,
                   num_stages=None, num_splits=None, interpret=None):
    """The expand kernel for modules `mods` (one width): [T, len(mods) * width] float32,
    in token order."""
    n_rows, h = rows.shape
    c, _ = matrix_form(width, h)
    bt, nt = gp.bt, gp.num_tiles
    bn = block_n or _block_n(c, width, bt)
    splits = num_splits or _divisor_at_most(width // bn, -(-TARGET_BLOCKS // (nt * len(mods))))
    stage = (ROWS * bn + bt * ROWS) * 2
    stages = num_stages or max(2, min(4, (SMEM_BYTES - 2 * bn * bt * 4) // stage))
    groups = _width_groups(gp.widths)
    assert groups[width] == list(mods), "an expand launch serves all modules of its width"
    grp = gp.e_rows[list(groups).index(width)]
    out = _expand_call(gp.e_starts[jnp.asarray(mods)], grp, xs,
                       rows.reshape(n_rows * (h // c), c), bt=bt, bn=bn, stages=stages,
                       splits=splits, width=width, chunk_width=c,
                       interpret=default_interpret() if interpret is None else interpret)
    return out[gp.plan["where"]]


def _xs_index(gp: GroupPlan, mods: list[int]):
    """Index arrays over the expand's xs [Mg, e_bound, bt, 8 groups, 8 rank rows]: each
    element's item, group within the item's module, token column and rank row, its scale,
    and whether it is live (a packed group, below its slot's rank, and one of the item's
    own tokens: zeros elsewhere make the product block-diagonal). Shaped so that the
    gathers below write xs in the kernel's layout, with no transpose after them."""
    plan, s, bt = gp.plan, gp.num_slots, gp.bt
    mg = len(mods)
    m = jnp.asarray(mods).reshape(mg, 1, 1, 1, 1)
    item = gp.e_item[jnp.asarray(mods)].reshape(mg, gp.e_bound, 1, CHUNK, 1)
    grp = gp.e_group[jnp.asarray(mods)].reshape(mg, gp.e_bound, 1, CHUNK, 1)
    col = jnp.arange(bt, dtype=jnp.int32).reshape(1, 1, bt, 1, 1)
    rr = jnp.arange(GROUP, dtype=jnp.int32).reshape(1, 1, 1, 1, GROUP)
    w = jnp.maximum(item, 0)
    slot = jnp.minimum(plan["item_slot"][w], s - 1)
    tok = plan["item_tile"][w] * bt + col                                  # sorted position
    live = ((grp >= 0) & (grp * GROUP + rr < gp.ranks[slot, m])
            & (tok >= plan["item_lo"][w]) & (tok < plan["item_hi"][w]))
    return dict(m=m, w=w, grp=jnp.maximum(grp, 0), col=col, rr=rr, tok=tok, live=live,
                scale=gp.scales[slot, m])


def _xs_finish(gp, ix, vals, dtype):
    xs = jnp.where(ix["live"], vals * ix["scale"], 0.0).astype(dtype)
    return xs.reshape(xs.shape[0], gp.e_bound, gp.bt, ROWS)


def _xs_from_shrink(gp: GroupPlan, out_s, mods: list[int], dtype):
    """The expand's xs straight from the shrink kernel's chunks (sum of the K splits)."""
    ix = _xs_index(gp, mods)
    og = out_s.reshape(out_s.shape[0], gp.s_bound * CHUNK, GROUP, gp.bt)
    src = gp.s_pos[ix["w"], ix["m"]] + ix["grp"]               # packed shrink group
    return _xs_finish(gp, ix, og[:, src, ix["rr"], ix["col"]].sum(0), dtype)


def _xs_from_xa(gp: GroupPlan, xa, mods: list[int], dtype):
    """The expand's xs from xa [Mg, T, R] (module j of xa is module mods[j])."""
    ix = _xs_index(gp, mods)
    order = jnp.pad(gp.plan["order"], (0, gp.num_tiles * gp.bt - gp.t))
    j = jnp.arange(len(mods)).reshape(-1, 1, 1, 1, 1)
    i = jnp.minimum(ix["grp"] * GROUP + ix["rr"], xa.shape[2] - 1)
    return _xs_finish(gp, ix, xa[j, order[ix["tok"]], i], dtype)


def make_group_plan(token_slot, rows, slot_pages, a_offsets, b_offsets, ranks, scales, *,
                    k_in, widths, max_rank, page_size, plan=None,
                    block_tokens=None) -> GroupPlan:
    """`group_plan` from the step's tables; `plan` (the token plan) is reused when its
    block_tokens is the default one. k_in None: no shrink part; widths (): no expand."""
    t, s = token_slot.shape[0], slot_pages.shape[0]
    bt = block_tokens or pick_block_tokens(t, s)
    if plan is None or bt != pick_block_tokens(t, s):
        plan = plan_batch(token_slot, s, bt)
    return group_plan(plan, slot_pages, a_offsets, b_offsets, ranks, scales, t=t, k_in=k_in,
                      widths=widths, h=rows.shape[1], page_size=page_size, max_rank=max_rank,
                      block_tokens=bt, num_rows=rows.shape[0])


def lora_apply_multi(x, rows, slot_pages, a_offsets, b_offsets, ranks, scales, token_slot, *,
                     max_rank, out_features, page_size, plan=None, interpret=None):
    """The LoRA terms of M modules that read the same x (`lora.lora_apply_modules`):
    one shrink launch, one gather into the expand's packing, one expand launch per
    distinct width. `plan`: a `GroupPlan` of this group (built once per step), or the
    token plan, or None. Returns M arrays [T, out_m] float32."""
    n_mod = len(out_features)
    why = _why_not(x.shape[1], out_features, rows.shape[1], page_size, rows.dtype,
                   plan.bt if isinstance(plan, GroupPlan) else
                   pick_block_tokens(x.shape[0], slot_pages.shape[0]))
    if why:
        _fallback(why)
        return tuple(lora_ref.lora_apply(
            x, rows, slot_pages, a_offsets[:, j], b_offsets[:, j], ranks[:, j], scales[:, j],
            token_slot, max_rank=max_rank, out_features=out_features[j], page_size=page_size)
            for j in range(n_mod))
    gp = plan if isinstance(plan, GroupPlan) else make_group_plan(
        token_slot, rows, slot_pages, a_offsets, b_offsets, ranks, scales, k_in=x.shape[1],
        widths=tuple(out_features), max_rank=max_rank, page_size=page_size, plan=plan)
    out_s = _shrink_launch(gp, x, rows, interpret=interpret)
    outs = [None] * n_mod
    for width, js in _width_groups(out_features).items():  # each distinct width, in order
        y = _expand_launch(gp, _xs_from_shrink(gp, out_s, js, rows.dtype), rows, js, width,
                           interpret=interpret)
        for n, j in enumerate(js):
            outs[j] = y[:, n * width:(n + 1) * width]
    return tuple(outs)


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

    a_offsets, ranks: [S, M]. Returns [M, T, max_rank] float32. `plan`, if given, is
    `batch_plan(token_slot, S)`.
    """
    t, k = x.shape
    s, n_mod = ranks.shape
    bt = block_tokens or pick_block_tokens(t, s)
    why = _why_not(k, (), rows.shape[1], page_size, rows.dtype, bt, block_k=block_k)
    if why:
        _fallback(why)
        return jnp.stack([lora_ref.lora_shrink_reference(
            x, rows, slot_pages, a_offsets[:, j], ranks[:, j], token_slot, max_rank=max_rank,
            page_size=page_size) for j in range(n_mod)])
    gp = make_group_plan(token_slot, rows, slot_pages, a_offsets, None, ranks,
                         jnp.ones(ranks.shape, jnp.float32), k_in=k, widths=(),
                         max_rank=max_rank, page_size=page_size, plan=plan, block_tokens=bt)
    out_s = _shrink_launch(gp, x, rows, block_k=block_k, num_stages=num_stages,
                           num_splits=num_splits, interpret=interpret)
    og = out_s.reshape(out_s.shape[0], gp.s_bound * CHUNK, GROUP, bt)
    key, pos = gp.plan["key"], gp.plan["where"]
    w = gp.plan["pos_item"][pos]
    i = jnp.arange(max_rank, dtype=jnp.int32)
    src = gp.s_pos[w][:, :, None] + i // GROUP                                 # [T, M, R]
    vals = og[:, src, i % GROUP, (pos % bt)[:, None, None]].sum(0)
    keep = (key < s)[:, None, None] & (i < ranks[jnp.minimum(key, s - 1)][:, :, None])
    return jnp.where(keep, vals, 0.0).transpose(1, 0, 2)


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
    s = slot_pages.shape[0]
    bt = block_tokens or pick_block_tokens(t, s)
    widths = (out_features,) * n_mod
    why = _why_not(None, widths, rows.shape[1], page_size, rows.dtype, bt, block_n=block_n)
    if why:
        _fallback(why)
        return jnp.concatenate([lora_ref.lora_expand_reference(
            xa[j], rows, slot_pages, b_offsets[:, j], ranks[:, j], scales[:, j], token_slot,
            out_features=out_features, page_size=page_size) for j in range(n_mod)], axis=1)
    gp = make_group_plan(token_slot, rows, slot_pages, None, b_offsets, ranks, scales,
                         k_in=None, widths=widths, max_rank=max_rank, page_size=page_size,
                         plan=plan, block_tokens=bt)
    mods = list(range(n_mod))
    return _expand_launch(gp, _xs_from_xa(gp, xa, mods, rows.dtype), rows, mods, out_features,
                          block_n=block_n, num_stages=num_stages, num_splits=num_splits,
                          interpret=interpret)
