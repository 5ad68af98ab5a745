"""Heterogeneous-batch LoRA (S-LoRA's MBGMV/MBGMM) as Pallas Mosaic GPU kernels.

The kernels behind `pallas_kernels.lora` when `backend="pallas"`: the contract
of `lora_shrink_reference` and `lora_expand_reference`, computed straight from
the adapters' pool pages. Their work plan (token tiles, items, the packing of
rank rows into 64-row chunks) is `pallas_kernels.lora_plan`, built by XLA once
per step; this module holds the kernels and the launches.

- shrink (x·A), one launch for the M modules that read the same x (q/k/v,
  gate/up): a chunk computes out[64 rows, tile tokens] = rows · x_tile^T over
  its share of K = in (grid: tile x chunk lane x K split); each token later
  takes its own slot's rows from its own column. XLA sums the K splits.
- expand ((xa)·B), one launch per output width: a tile's chunks are the K of
  one product, out^T[n, tokens] = B_chunks^T · xs^T, where xs is the
  block-diagonal [tokens, 64] slice of scale·xa that gives each token only its
  own slot's rows (zeros elsewhere). A tile's output rows are finished in the
  block and stored, in plan order, by one TMA copy per N step (with a sorted
  plan XLA un-sorts them where it adds them to the base output).

Between the two, one XLA gather turns the shrink's chunks into the expand's xs
(`lora_apply_multi`), so a module group costs two launches and one or two small
XLA fusions per layer (two more, the sort gather and the un-sort, with a sorted
plan); the plan depends on the step's slots only and is built once for all layers.

Widths the kernels serve: any W with C % 64 == 0 (C = W for a flat matrix,
gcd(W, H) for a chunked one), on both sides. Others (and pool dtypes other
than bf16/f16) use the reference and say so once in the log.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (default_interpret, finite_or_zero, smem_transforms,
                                        warn_once)
from pallas_kernels import lora_reference as lora_ref
from pallas_kernels.lora_plan import (
    CHUNK, GROUP, ROWS, GroupPlan, make_group_plan, pick_block_tokens, plan_order, plan_where,
    split_sum, width_groups, xs_from_shrink, xs_from_xa)
from pallas_kernels.geometry import check_option, matrix_form

_log = logging.getLogger(__name__)
_warned: set[str] = set()

TARGET_BLOCKS = 4 * 132  # expand: split N until about this many blocks (4 per H100 SM)
# Expand splits that need not divide the N steps (`_expand_splits`). On since measured:
# the W = 11008 expand (43 N steps, prime) at B=128 took 285.8 us with even splits and
# 43.1 us ragged, kernel alone, on the H100 (benchmarks/PERF.md).
RAGGED_SPLITS = True
SHRINK_BLOCKS = 132      # shrink: split K until about this many blocks
STAGE_BYTES = 40 << 10   # SMEM per pipeline stage we aim for
SMEM_BYTES = 110 << 10   # SMEM per block for the stages: two blocks fit on an SM


def _fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"lora_mgpu: {what}; using the jnp reference for this shape")


def _copy_if(predicate: bool, cond) -> dict:
    """Skip a copy on the GPU. The interpreter takes no predicate: there the copy
    runs, from a row past the pool, and TMA's zero fill gives the same result."""
    return {"predicate": cond} if predicate else {}


def _expand_splits(n_steps: int, want: int, ragged: bool | None = None) -> int:
    """N splits of the expand: the largest divisor of n_steps up to `want`; if `ragged`
    (None: RAGGED_SPLITS) and that divisor is under half of `want`, as many splits as
    `want` (the last split takes fewer N steps), trimmed so that none is empty."""
    even = _divisor_at_most(n_steps, want)
    if not (RAGGED_SPLITS if ragged is None else ragged) or 2 * even >= min(want, n_steps):
        return even
    per = -(-n_steps // min(want, n_steps))
    return -(-n_steps // per)


def _divisor_at_most(n: int, want: int) -> int:
    """The largest divisor of n that is <= max(want, 1)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(want, 1))


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

def _shrink_kernel(starts_ref, tile_ref, grp_ref, x_ref, rows_ref, out_ref, a_smem, x_smem,
                   o_smem, bars, *, bt, bk, nk, stages, lanes, balanced, num_tiles, chunk_width,
                   num_rows, predicate):
    """Block (b, split), b < num_tiles * lanes. By tile: block b = tile * lanes + lane
    takes the tile's chunks lane, lane + lanes, ...; balanced: the C chunks of the
    batch are cut into as many even runs as there are blocks, whatever their tiles
    (a tile of many rank rows no longer makes its blocks the slowest). Each chunk runs
    over this split's nk K steps; one pipeline runs through all of them."""
    b = lax.axis_index("b")
    split = lax.axis_index("s")
    if balanced:
        nb = num_tiles * lanes                           # the grid's blocks along b
        c_total = starts_ref[num_tiles]
        first, stride = b * c_total // nb, 1
        mine = (b + 1) * c_total // nb - first
    else:
        tile, lane = b // lanes, lax.rem(b, lanes)
        first, stride = starts_ref[tile] + lane, lanes
        mine = (starts_ref[tile + 1] - first + lanes - 1) // lanes
    total = mine * nk

    def issue(step, stage):
        j = step // nk
        k0 = (split * nk + step - j * nk) * bk
        ch = k0 // chunk_width
        col = pl.multiple_of(k0 - ch * chunk_width, bk)
        chunk = first + j * stride
        tok0 = pl.multiple_of((tile_ref[chunk] if balanced else tile) * bt, bt)
        row0 = chunk * CHUNK
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
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, first + j * stride])

        plgpu.wait_smem_to_gmem(0)


# Jitted with its static configuration, so a kernel of one shape is traced and
# lowered once per step function, not once per layer and module: the layers are
# a Python loop, and Mosaic GPU lowering of each call costs seconds.
@functools.partial(jax.jit, static_argnames=(
    "bound", "bt", "bk", "stages", "splits", "lanes", "balanced", "chunk_width", "interpret"))
def _shrink_call(starts, chunk_tile, grp, x_sorted, rows_c, *, bound, bt, bk, stages, splits,
                 lanes, balanced, chunk_width, interpret):
    nt = starts.shape[0] - 1
    dt = rows_c.dtype
    body = functools.partial(_shrink_kernel, bt=bt, bk=bk, nk=x_sorted.shape[1] // (bk * splits),
                             stages=stages, lanes=lanes, balanced=balanced, num_tiles=nt,
                             chunk_width=chunk_width, num_rows=rows_c.shape[0],
                             predicate=not interpret)
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
    )(starts, chunk_tile, grp, x_sorted, rows_c)


# --- expand kernel ------------------------------------------------------------------

def _expand_kernel(starts_ref, guard_ref, grp_ref, xs_ref, rows_ref, out_ref, *scratch, bt, bn,
                   num_n, stages, splits, width, chunk_width):
    """Block (tile, module * splits + split): num_n N steps of bn columns, each the
    sum over the tile's chunks; one pipeline runs through all (N step, chunk). Where
    splits do not divide the width's N steps (W = 11008 has 43 of 256 columns), each
    split takes num_n of them and the last split fewer (a dynamic count).

    Narrow tiles (bt < 64 tokens, decode) compute out^T [bn, bt] = B^T · xs^T, the
    wgmma's 64+ rows being output columns, and transpose through SMEM; wide tiles
    (bt a multiple of 64, long prefill segments) compute out [bt, bn] = xs · B as it
    is stored (the PV product of attention).

    A token's xs is 0 on the rows of other slots, but 0 * NaN is NaN: in a tile whose
    B rows are not all every token's own (`lora_plan._expand_guard`), B is made finite
    in SMEM before the product, so another slot's row adds exactly 0 (a non-finite
    row then changes only its own slot's tokens, which read it)."""
    wide = bt % 64 == 0
    if wide:
        b_smem, xs_smem, o_smem, bars = scratch
    else:
        b_smem, xs_smem, t_smem, o_smem, bars = scratch
    tile = lax.axis_index("t")
    mod = lax.axis_index("s") // splits
    split = lax.rem(lax.axis_index("s"), splits)
    c0 = starts_ref[mod, tile]
    guard = guard_ref[mod, tile] != 0
    nch = starts_ref[mod, tile + 1] - c0
    n_steps = width // bn
    if num_n * splits == n_steps:
        my_n = num_n                       # even splits: a static count
    else:
        my_n = jnp.minimum(jnp.maximum(n_steps - split * num_n, 0), num_n)
    total = my_n * nch
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

    @pl.loop(0, my_n)
    def _n(ns):
        def acc_scope(acc_ref):
            def mma(st):
                @pl.when(guard)
                def _finite_b():
                    b_tile = b_smem.at[st]
                    b_tile[...] = finite_or_zero(b_tile[...])
                    plgpu.commit_smem()

                if wide:
                    plgpu.wgmma(acc_ref, xs_smem.at[st], b_smem.at[st])
                else:
                    plgpu.wgmma(acc_ref, b_smem.at[st].T, xs_smem.at[st].T)

            @pl.loop(0, nch)
            def _k(kc):
                _step(ns * nch + kc, total, stages, bars, issue, mma)
            return acc_ref[...]

        # Zeros for a tile with no chunk.
        acc = pl.run_scoped(acc_scope, plgpu.ACC((bt, bn) if wide else (bn, bt), jnp.float32))
        if o_smem.dtype != jnp.float32:
            acc = acc.astype(o_smem.dtype)
        if not wide:
            # Transpose through SMEM, [n, tok] -> [tok, n]: a token's row is contiguous.
            t_smem[...] = acc
            plgpu.commit_smem()
            acc = plgpu.load(t_smem.T, layout=plgpu.Layout.WG_STRIDED((bt, bn), vec_size=1))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)       # the last N step is out
        o_smem[...] = acc
        plgpu.commit_smem()
        n0 = pl.multiple_of(mod * width + n_base + ns * bn, bn)
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(tile * bt, bt), pl.ds(n0, bn)])

    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=(
    "bt", "bn", "stages", "splits", "width", "chunk_width", "out_dtype", "interpret"))
def _expand_call(starts, guard, grp, xs, rows_c, *, bt, bn, stages, splits, width, chunk_width,
                 out_dtype, interpret):
    n_mod, nt = starts.shape[0], starts.shape[1] - 1
    dt = rows_c.dtype
    body = functools.partial(_expand_kernel, bt=bt, bn=bn, num_n=-(-width // (bn * splits)),
                             stages=stages, splits=splits, width=width,
                             chunk_width=chunk_width)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((nt * bt, n_mod * width), out_dtype),
        grid=(nt, n_mod * splits),
        grid_names=("t", "s"),
        kernel_name="mgpu_lora_expand",
        scratch_types=[
            plgpu.SMEM((stages, ROWS, bn), dt, transforms=smem_transforms(bn, dt)),
            plgpu.SMEM((stages, bt, ROWS), dt, transforms=smem_transforms(ROWS, dt)),
            *([plgpu.SMEM((bt, bn), out_dtype, transforms=smem_transforms(bn, out_dtype))]
              if bt % 64 == 0 else
              [plgpu.SMEM((bn, bt), out_dtype), plgpu.SMEM((bt, bn), out_dtype)]),
            plgpu.Barrier(num_arrivals=CHUNK + 1, num_barriers=stages),
        ],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(starts, guard, grp, xs, rows_c)

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
                   num_lanes=None, balanced=None, interpret=None):
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
    x = x.astype(rows.dtype)
    if gp.sorted:
        x = x[plan_order(gp.plan, t, nt * bt)]           # the tiles read x in sorted order
    elif nt * bt > t:
        x = jnp.pad(x, ((0, nt * bt - t), (0, 0)))
    return _shrink_call(gp.s_starts, gp.s_tile, gp.s_rows, x,
                        rows.reshape(n_rows * (h // c), c), bound=gp.s_bound, bt=bt, bk=bk,
                        stages=stages, splits=splits, lanes=lanes,
                        balanced=gp.balanced if balanced is None else balanced, chunk_width=c,
                        interpret=default_interpret() if interpret is None else interpret)


def _expand_launch(gp: GroupPlan, xs, rows, mods: list[int], width: int, *, block_n=None,
                   num_stages=None, num_splits=None, out_dtype=jnp.float32,
                   ragged_splits=None, interpret=None):
    """The expand kernel for modules `mods` (one width): [T, len(mods) * width] in
    `out_dtype` (float32, or the pool's 16-bit dtype), in token order."""
    n_rows, h = rows.shape
    c, _ = matrix_form(width, h)
    bt, nt = gp.bt, gp.num_tiles
    bn = block_n or _block_n(c, width, bt)
    splits = num_splits or _expand_splits(width // bn, -(-TARGET_BLOCKS // (nt * len(mods))),
                                          ragged_splits)
    if not 1 <= splits <= width // bn or -(-(width // bn) // splits) * (splits - 1) >= width // bn:
        raise ValueError(f"num_splits={splits}: {width // bn} N steps of {bn} columns leave "
                         "a split with none")
    stage = (ROWS * bn + bt * ROWS) * 2
    out_dtype = jnp.dtype(out_dtype)
    epilogue = (1 if bt % 64 == 0 else 2) * bn * bt * out_dtype.itemsize   # o (and t) SMEM
    stages = num_stages or max(2, min(4, (SMEM_BYTES - epilogue) // stage))
    groups = width_groups(gp.widths)
    assert groups[width] == list(mods), "an expand launch serves all modules of its width"
    grp = gp.e_rows[list(groups).index(width)]
    out = _expand_call(gp.e_starts[jnp.asarray(mods)], gp.e_guard[jnp.asarray(mods)], grp, xs,
                       rows.reshape(n_rows * (h // c), c), bt=bt, bn=bn, stages=stages,
                       splits=splits, width=width, chunk_width=c, out_dtype=out_dtype,
                       interpret=default_interpret() if interpret is None else interpret)
    return out[gp.plan["where"]] if gp.sorted else out[:gp.t]


def expand_out_dtype(pool_dtype, mode: str = "float32"):
    """The dtype the expand writes for `mode` (`StepSpec.lora_out`): "float32", or
    "pool" (the pool's 16-bit dtype: half the bytes, and the rounding PEFT's bf16 LoRA
    layers do)."""
    check_option("lora_out", mode)
    return jnp.dtype(jnp.float32 if mode == "float32" else pool_dtype)


def lora_apply_multi(x, rows, slot_pages, a_offsets, b_offsets, ranks, scales, token_slot, *,
                     max_rank, out_features, page_size, plan=None, out_dtype=None,
                     interpret=None):
    """The LoRA terms of M modules that read the same x (`lora.lora_apply_modules`):
    one shrink launch, one gather into the expand's packing, one expand launch per
    distinct width. `plan`: a `GroupPlan` of this group (built once per step), or the
    token plan, or None. Returns M arrays [T, out_m] in `out_dtype` (default float32;
    or the pool dtype, see `expand_out_dtype`)."""
    n_mod = len(out_features)
    why = _why_not(x.shape[1], out_features, rows.shape[1], page_size, rows.dtype,
                   plan.bt if isinstance(plan, GroupPlan) else
                   pick_block_tokens(x.shape[0], slot_pages.shape[0]))
    if why:
        _fallback(why)
        return tuple(lora_ref.lora_apply_reference(
            x, rows, slot_pages, a_offsets[:, j], b_offsets[:, j], ranks[:, j], scales[:, j],
            token_slot, max_rank=max_rank, out_features=out_features[j], page_size=page_size)
            for j in range(n_mod))
    gp = plan if isinstance(plan, GroupPlan) else make_group_plan(
        token_slot, rows, slot_pages, a_offsets, b_offsets, ranks, scales, k_in=x.shape[1],
        widths=tuple(out_features), max_rank=max_rank, page_size=page_size, plan=plan)
    out_dtype = jnp.dtype(out_dtype or jnp.float32)
    out_s = _shrink_launch(gp, x, rows, interpret=interpret)
    outs = [None] * n_mod
    for width, js in width_groups(out_features).items():  # each distinct width, in order
        y = _expand_launch(gp, xs_from_shrink(gp, out_s, js, rows.dtype), rows, js, width,
                           out_dtype=out_dtype, interpret=interpret)
        for n, j in enumerate(js):
            outs[j] = y[:, n * width:(n + 1) * width]
    return tuple(outs)


def lora_shrink(x: jax.Array, rows: jax.Array, slot_pages: jax.Array, a_offset: jax.Array,
                rank: jax.Array, token_slot: jax.Array, *, max_rank: int, page_size: int,
                **kw) -> jax.Array:
    """xa[t] = x[t] · A_{slot(t)}: x [T, in], rows [N, H] -> [T, max_rank] float32.

    See `pallas_kernels.lora_reference.lora_shrink_reference` for the contract; offsets must be
    8-aligned in the matrix's view, as `KVLayout.adapter_offsets` places them.
    Keywords as `lora_shrink_multi`.
    """
    return lora_shrink_multi(x, rows, slot_pages, a_offset[:, None], rank[:, None], token_slot,
                             max_rank=max_rank, page_size=page_size, **kw)[0]


def lora_shrink_multi(x: jax.Array, rows: jax.Array, slot_pages: jax.Array,
                      a_offsets: jax.Array, ranks: jax.Array, token_slot: jax.Array, *,
                      max_rank: int, page_size: int, block_tokens: int | None = None,
                      block_k: int | None = None, num_stages: int | None = None,
                      num_splits: int | None = None, plan: dict | None = None,
                      sort: bool | None = None, balanced: bool = False,
                      interpret=None) -> jax.Array:
    """The shrinks of M modules that read the same x (q/k/v; gate/up) in one launch.

    a_offsets, ranks: [S, M]. Returns [M, T, max_rank] float32. `plan`, if given, is
    `batch_plan(token_slot, S)`; else one is built, sorted by `sort_policy` unless
    `sort` says. `balanced`: spread the chunks evenly over the blocks (`GroupPlan`).
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
                         max_rank=max_rank, page_size=page_size, plan=plan, block_tokens=bt,
                         sort=sort, balanced=balanced)
    out_s = _shrink_launch(gp, x, rows, block_k=block_k, num_stages=num_stages,
                           num_splits=num_splits, interpret=interpret)
    og = out_s.reshape(out_s.shape[0], gp.s_bound * CHUNK, GROUP, bt)
    key, pos = gp.plan["key"], plan_where(gp.plan, t)
    w = gp.plan["pos_item"][pos]
    i = jnp.arange(max_rank, dtype=jnp.int32)
    src = gp.s_pos[w][:, :, None] + i // GROUP                                 # [T, M, R]
    vals = split_sum(og, src, i % GROUP, (pos % bt)[:, None, None])
    keep = (key < s)[:, None, None] & (i < ranks[jnp.minimum(key, s - 1)][:, :, None])
    return jnp.where(keep, vals, 0.0).transpose(1, 0, 2)


def lora_expand(xa: jax.Array, rows: jax.Array, slot_pages: jax.Array, b_offset: jax.Array,
                rank: jax.Array, scale: jax.Array, token_slot: jax.Array, *, out_features: int,
                page_size: int, **kw) -> jax.Array:
    """y[t] = scale_{slot(t)} · xa[t] · B_{slot(t)}: xa [T, R] f32 -> [T, out] float32.

    See `pallas_kernels.lora_reference.lora_expand_reference` for the contract (offsets 8-aligned
    in the matrix's view, as `KVLayout.adapter_offsets` places them). xa·scale is
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
                      plan: dict | None = None, sort: bool | None = None,
                      out_dtype=jnp.float32, ragged_splits: bool | None = None,
                      interpret=None) -> jax.Array:
    """The expands of M modules of one output width in one launch.

    xa: [M, T, R] f32 (`lora_shrink_multi`); b_offsets, ranks, scales: [S, M].
    Returns [T, M · out_features] in `out_dtype` (float32, or the pool dtype), module m
    in columns [m·out, (m+1)·out). `plan`, `sort`: as `lora_shrink_multi`.
    `ragged_splits`: N splits need not divide the N steps (None: RAGGED_SPLITS).
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
                         plan=plan, block_tokens=bt, sort=sort)
    mods = list(range(n_mod))
    return _expand_launch(gp, xs_from_xa(gp, xa, mods, rows.dtype), rows, mods, out_features,
                          block_n=block_n, num_stages=num_stages, num_splits=num_splits,
                          out_dtype=out_dtype, ragged_splits=ragged_splits,
                          interpret=interpret)
