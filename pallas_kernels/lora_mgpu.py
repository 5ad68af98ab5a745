"""Heterogeneous-batch LoRA (S-LoRA's MBGMV/MBGMM) as Pallas Mosaic GPU kernels.

The kernels behind `pallas_kernels.lora.lora_apply` for a plan with a packing: the
contract of `lora_shrink_reference` and `lora_expand_reference`, computed straight
from the adapters' pool pages. Their work plan (token tiles, items, the packing of
rank rows into 64-row chunks) is `pallas_kernels.lora_plan.GroupPlan`, built by XLA
once per step; this module holds the kernels and their launches.

- shrink (x·A), one launch for the M modules that read the same x (q/k/v,
  gate/up): a chunk computes out[64 rows, tile tokens] = rows · x_tile^T over
  its share of K = in (grid: block x K split, the batch's chunks cut evenly over
  the blocks); each token later takes its own slot's rows from its own column.
- expand ((xa)·B), one launch per output width: a tile's chunks are the K of
  one product, out^T[n, tokens] = B_chunks^T · xs^T, where xs is the
  block-diagonal [tokens, 64] slice of scale·xa that gives each token only its
  own slot's rows (zeros elsewhere). A tile's output rows are finished in the
  block and stored, in token order, by one TMA copy per N step.

Between the two, one XLA gather sums the shrink's K splits into the expand's xs
(`lora_plan.xs_from_shrink`), so a module group costs two launches and one or two
small XLA fusions per layer.

Widths the kernels serve: any W with C % 64 == 0 (C = W for a flat matrix,
gcd(W, H) for a chunked one), on both sides. Others (and pool dtypes other
than bf16/f16) use the reference and say so once in the log (`why_not`).
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

from pallas_kernels.geometry import matrix_form
from pallas_kernels.lora_plan import (CHUNK, GROUP, ROWS, GroupPlan, split_sum, width_groups,
                                      xs_from_shrink, xs_from_xa)
from pallas_kernels.mgpu_common import (default_interpret, finite_or_zero, smem_transforms,
                                        warn_once)

_log = logging.getLogger(__name__)
_warned: set[str] = set()

_BLOCK_TOKENS = (8, 16, 32, 64, 128)
_BLOCK_COLUMNS = (None, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """How the LoRA op cuts its work: the token plan's tiles and order, and the kernels'
    blocks, splits and stages. The defaults are the choices measured best on the H100
    and H200 (benchmarks/PERF.md); `None` picks per shape from the targets above it.
    Static: hashable, passed to jitted functions as a static argument."""
    # The token plan (`pallas_kernels.lora.token_plan`).
    decode_block_tokens: int = 32    # decode: tokens per tile at most
    prefill_block_tokens: int = 64   # prefill: tiles of 64 take the expand's wide form
    unsorted_max_tokens: int = 32    # decode: batches of at most this many stay unsorted
    # The kernels' work split (benchmarks/tune_lora.py sweeps these).
    shrink_blocks: int = 132         # shrink: split K until about this many blocks
    expand_blocks: int = 4 * 132     # expand: split N until about this many blocks
    stage_bytes: int = 40 << 10      # SMEM per pipeline stage aimed for (block_k)
    smem_bytes: int = 110 << 10      # SMEM per block for the stages: two blocks per SM
    block_k: int | None = None       # shrink: K columns per step
    block_n: int | None = None       # expand: N columns per step
    shrink_lanes: int | None = None  # shrink: blocks per token tile
    shrink_splits: int | None = None  # shrink: K splits
    expand_splits: int | None = None  # expand: N splits (need not divide the N steps)
    shrink_stages: int | None = None
    expand_stages: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            why = _invalid(field, value)
            if why:
                raise ValueError(f"TuningConfig.{field.name}: {value!r} {why}")


def _invalid(field: dataclasses.Field, value) -> str | None:
    """Why `value` is not a valid value of TuningConfig field `field` (None: it is)."""
    if field.name.endswith("block_tokens"):
        return None if value in _BLOCK_TOKENS else f"is not one of {_BLOCK_TOKENS}"
    if field.name in ("block_k", "block_n"):
        return None if value in _BLOCK_COLUMNS else f"is not one of {_BLOCK_COLUMNS}"
    if value is None and field.default is None:
        return None
    lo = 0 if field.name == "unsorted_max_tokens" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        return f"is not an int >= {lo}" + (" or None" if field.default is None else "")
    return None


def warn_fallback(what: str) -> None:
    warn_once(_log, _warned, what, f"lora_mgpu: {what}; using the jnp reference for this shape")


def _copy_if(predicate: bool, cond) -> dict:
    """Skip a copy on the GPU. The interpreter takes no predicate: there the copy
    runs, from a row past the pool, and TMA's zero fill gives the same result."""
    return {"predicate": cond} if predicate else {}


def _expand_splits(n_steps: int, want: int) -> int:
    """N splits of the expand: the largest divisor of n_steps up to `want`; if that is
    under half of `want`, as many splits as `want` (the last split takes fewer N steps:
    W = 11008 has 43 steps of 256 columns, prime), trimmed so that none is empty."""
    even = _divisor_at_most(n_steps, want)
    if 2 * even >= min(want, n_steps):
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
                   o_smem, bars, *, bt, bk, nk, stages, num_tiles, num_blocks, chunk_width,
                   num_rows, predicate):
    """Block (b, split): the batch's chunks are cut into as many even runs as there are
    blocks along b, whatever their tiles (so a tile of many rank rows does not make its
    blocks the slowest). Each chunk runs over this split's nk K steps; one pipeline runs
    through all of them."""
    b = lax.axis_index("b")
    split = lax.axis_index("s")
    c_total = starts_ref[num_tiles]
    first = b * c_total // num_blocks
    mine = (b + 1) * c_total // num_blocks - first
    total = mine * nk

    def issue(step, stage):
        j = step // nk
        k0 = (split * nk + step - j * nk) * bk
        ch = k0 // chunk_width
        col = pl.multiple_of(k0 - ch * chunk_width, bk)
        chunk = first + j
        tok0 = pl.multiple_of(tile_ref[chunk] * bt, bt)
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
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, first + j])

        plgpu.wait_smem_to_gmem(0)


# Jitted with its static configuration, so a kernel of one shape is traced and
# lowered once per step function, not once per layer and module: the layers are
# a Python loop, and Mosaic GPU lowering of each call costs seconds.
@functools.partial(jax.jit, static_argnames=(
    "bound", "bt", "bk", "stages", "splits", "lanes", "chunk_width", "interpret"))
def _shrink_call(starts, chunk_tile, grp, x, rows_c, *, bound, bt, bk, stages, splits, lanes,
                 chunk_width, interpret):
    nt = starts.shape[0] - 1
    dt = rows_c.dtype
    body = functools.partial(_shrink_kernel, bt=bt, bk=bk, nk=x.shape[1] // (bk * splits),
                             stages=stages, num_tiles=nt, num_blocks=nt * lanes,
                             chunk_width=chunk_width,
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
    )(starts, chunk_tile, grp, x, rows_c)


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
    "bt", "bn", "stages", "splits", "width", "chunk_width", "interpret"))
def _expand_call(starts, guard, grp, xs, rows_c, *, bt, bn, stages, splits, width, chunk_width,
                 interpret):
    f32 = jnp.float32
    n_mod, nt = starts.shape[0], starts.shape[1] - 1
    dt = rows_c.dtype
    body = functools.partial(_expand_kernel, bt=bt, bn=bn, num_n=-(-width // (bn * splits)),
                             stages=stages, splits=splits, width=width,
                             chunk_width=chunk_width)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((nt * bt, n_mod * width), f32),
        grid=(nt, n_mod * splits),
        grid_names=("t", "s"),
        kernel_name="mgpu_lora_expand",
        scratch_types=[
            plgpu.SMEM((stages, ROWS, bn), dt, transforms=smem_transforms(bn, dt)),
            plgpu.SMEM((stages, bt, ROWS), dt, transforms=smem_transforms(ROWS, dt)),
            *([plgpu.SMEM((bt, bn), f32, transforms=smem_transforms(bn, f32))]
              if bt % 64 == 0 else [plgpu.SMEM((bn, bt), f32), plgpu.SMEM((bt, bn), f32)]),
            plgpu.Barrier(num_arrivals=CHUNK + 1, num_barriers=stages),
        ],
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
    )(starts, guard, grp, xs, rows_c)

# --- launches and the XLA around them -----------------------------------------------

def _block_k(c: int, bt: int, config: TuningConfig) -> int:
    return config.block_k or next(
        (b for b in (256, 128, 64) if (ROWS + bt) * b * 2 <= config.stage_bytes and c % b == 0),
        64)


def _block_n(c: int, width: int, bt: int, config: TuningConfig) -> int:
    return config.block_n or next(
        (b for b in (256, 128, 64) if b <= min(width, 16384 // bt) and c % b == 0), 64)


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


def why_not(gp: GroupPlan, rows, page_size: int, config: TuningConfig) -> str | None:
    """Why the kernels cannot serve this module group over pool rows `rows` [N, H]
    (None: they can)."""
    h, bt = rows.shape[1], gp.tokens.block_tokens
    if gp.k_in is not None:
        c, _ = matrix_form(gp.k_in, h)
        why = _unsupported(gp.k_in, h, c, page_size, _block_k(c, bt, config), rows.dtype)
        if why:
            return f"shrink in={gp.k_in}, H={h}: {why}"
    for w in gp.widths:
        c, _ = matrix_form(w, h)
        why = _unsupported(w, h, c, page_size, _block_n(c, w, bt, config), rows.dtype)
        if why:
            return f"expand out={w}, H={h}: {why}"
    return None


def _shrink_launch(gp: GroupPlan, x, rows, config: TuningConfig, interpret):
    """The shrink kernel over the plan's packing: [splits, s_bound, 64, bt] float32."""
    t, k = x.shape
    n_rows, h = rows.shape
    c, _ = matrix_form(k, h)
    tp = gp.tokens
    bt, nt = tp.block_tokens, tp.num_tiles
    bk = _block_k(c, bt, config)
    # Lanes (blocks per tile) first, up to 4: a tile rarely has many more chunks; then K
    # splits to about shrink_blocks blocks: a split costs its partial sums' traffic, and
    # a block needs a few steps to keep its pipeline full.
    per_tile = -(-min(bt, tp.num_slots + 1) * gp.ranks.shape[1] * (-(-gp.max_rank // GROUP))
                 // CHUNK)
    lanes = config.shrink_lanes or max(1, min(4, per_tile))
    splits = config.shrink_splits or _divisor_at_most(
        k // bk, -(-config.shrink_blocks // (nt * lanes)))
    stage = (ROWS + bt) * bk * 2
    stages = config.shrink_stages or max(2, min(4, (config.smem_bytes - ROWS * bt * 4) // stage))
    x = x.astype(rows.dtype)
    if nt * bt > t:
        x = jnp.pad(x, ((0, nt * bt - t), (0, 0)))
    return _shrink_call(gp.s_starts, gp.s_tile, gp.s_rows, x,
                        rows.reshape(n_rows * (h // c), c), bound=gp.s_bound, bt=bt, bk=bk,
                        stages=stages, splits=splits, lanes=lanes, chunk_width=c,
                        interpret=default_interpret() if interpret is None else interpret)


def _expand_launch(gp: GroupPlan, xs, rows, mods: list[int], width: int, config: TuningConfig,
                   interpret):
    """The expand kernel for modules `mods`, all of one width: [T, len(mods) * width]
    float32, module m in columns [m·width, (m+1)·width)."""
    n_rows, h = rows.shape
    c, _ = matrix_form(width, h)
    tp = gp.tokens
    bt, nt = tp.block_tokens, tp.num_tiles
    bn = _block_n(c, width, bt, config)
    n_steps = width // bn
    splits = config.expand_splits or _expand_splits(
        n_steps, -(-config.expand_blocks // (nt * len(mods))))
    if splits > n_steps or -(-n_steps // splits) * (splits - 1) >= n_steps:
        raise ValueError(f"TuningConfig.expand_splits: {splits} splits of {n_steps} N steps "
                         f"of {bn} columns leave a split with none")
    stage = (ROWS * bn + bt * ROWS) * 2
    epilogue = (1 if bt % 64 == 0 else 2) * bn * bt * 4     # o (and t) SMEM, float32
    stages = config.expand_stages or max(2, min(4, (config.smem_bytes - epilogue) // stage))
    grp = gp.e_rows[list(width_groups(gp.widths)).index(width)]
    out = _expand_call(gp.e_starts[jnp.asarray(mods)], gp.e_guard[jnp.asarray(mods)], grp, xs,
                       rows.reshape(n_rows * (h // c), c), bt=bt, bn=bn, stages=stages,
                       splits=splits, width=width, chunk_width=c,
                       interpret=default_interpret() if interpret is None else interpret)
    return out[:tp.num_tokens]


def _expand_all(gp: GroupPlan, rows, xs_of, config, interpret) -> tuple:
    """One expand launch per distinct width, on `xs_of(mods)`: M arrays [T, out_m]."""
    outs = [None] * len(gp.widths)
    for width, js in width_groups(gp.widths).items():
        y = _expand_launch(gp, xs_of(js), rows, js, width, config, interpret)
        for n, j in enumerate(js):
            outs[j] = y[:, n * width:(n + 1) * width]
    return tuple(outs)


def lora_apply(x: jax.Array, rows: jax.Array, gp: GroupPlan, config: TuningConfig, *,
               interpret=None) -> tuple[jax.Array, ...]:
    """The LoRA terms of the M modules of `gp` that read x [T, k_in]: one shrink launch,
    one gather into the expand's packing, one expand launch per distinct width. rows:
    the layer's pool rows [N, H]. Returns M arrays [T, out_m] float32."""
    out_s = _shrink_launch(gp, x, rows, config, interpret)
    return _expand_all(gp, rows, lambda js: xs_from_shrink(gp, out_s, js, rows.dtype), config,
                       interpret)


def lora_shrink(x: jax.Array, rows: jax.Array, gp: GroupPlan, config: TuningConfig, *,
                interpret=None) -> jax.Array:
    """xa[m, t] = x[t] · A_{m, slot(t)}: x [T, k_in] -> [M, T, max_rank] float32, 0 past
    each slot's rank and for tokens without adapter (`lora_shrink_reference`)."""
    tp = gp.tokens
    t, s, bt = tp.num_tokens, tp.num_slots, tp.block_tokens
    out_s = _shrink_launch(gp, x, rows, config, interpret)
    og = out_s.reshape(out_s.shape[0], gp.s_bound * CHUNK, GROUP, bt)
    pos = jnp.arange(t, dtype=jnp.int32)
    i = jnp.arange(gp.max_rank, dtype=jnp.int32)
    src = gp.s_pos[tp.pos_item][:, :, None] + i // GROUP                      # [T, M, R]
    vals = split_sum(og, src, i % GROUP, (pos % bt)[:, None, None])
    key = tp.key
    keep = (key < s)[:, None, None] & (i < gp.ranks[jnp.minimum(key, s - 1)][:, :, None])
    return jnp.where(keep, vals, 0.0).transpose(1, 0, 2)


def lora_expand(xa: jax.Array, rows: jax.Array, gp: GroupPlan, config: TuningConfig, *,
                interpret=None) -> tuple[jax.Array, ...]:
    """y[t] = scale_{slot(t)} · xa[m, t] · B_{m, slot(t)}: xa [M, T, R] float32 -> M
    arrays [T, out_m] float32 (`lora_expand_reference`: scale·xa is rounded to the pool
    dtype for the tensor cores)."""
    return _expand_all(gp, rows, lambda js: xs_from_xa(gp, xa[jnp.asarray(js)], js, rows.dtype),
                       config, interpret)
