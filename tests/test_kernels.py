"""Mosaic GPU kernels vs their jnp references (pallas_kernels/*_mgpu.py).

On the CPU the kernels run through the Mosaic GPU interpreter
(`plgpu.InterpretGPUParams`, which fills every buffer with NaN before the
kernel runs, so an output element the kernel never writes fails the check).
Tests marked `gpu` compile the same kernels for the device at Llama-sized
shapes; run them there with `JAX_PLATFORMS=cuda pytest -m gpu tests/test_kernels.py`.

Every test draws fresh random inputs, with adapter and KV pages scattered over
the pool by a random permutation. Tolerances: the LoRA kernels multiply bf16
operands exactly and accumulate in float32, so their inputs are drawn
bf16-exact (and scales as powers of two) and the bound is float32 rounding of
sums of ~H terms; attention rounds P and the scaled q to bf16 (as every bf16
flash kernel does), so it is held to 2e-2 of the output's scale.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import lora, lora_mgpu, lora_plan, paged_attention, paged_attention_mgpu
from slora_jax.pool import PoolLayout, matrix_align

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


# --- LoRA -------------------------------------------------------------------------

def _bf16(rng, shape):
    """Fresh normal bf16 values, drawn on the device (pools of GBs on the GPU)."""
    return jax.random.normal(jax.random.key(int(rng.integers(1 << 31))), shape, jnp.bfloat16)


def lora_case(rng, *, h, t, s, max_rank, ranks, token_slot, page_size=8, pages_per_slot=None,
              spare_pages=8, widths=None):
    """A pool with `s` adapter slots on randomly scattered pages, and a token batch.

    Each slot holds one A^T [r, in] / B [r, out] pair (`widths`, default (h, h)) inside
    its own pages, at random offsets aligned as `PoolLayout.adapter_offsets` aligns
    them (8 rows of the matrix's view), in their stored form (`matrix_form`).
    """
    w_in, w_out = widths or (h, h)
    lay = PoolLayout(num_layers=1, num_pages=1, page_size=page_size, row_width=h,
                     num_kv_heads=1, head_dim=h, max_rank=max_rank, module_shapes=())
    a_al, b_al = matrix_align(w_in, h), matrix_align(w_out, h)
    a_off = rng.integers(0, 12, s) // a_al * a_al
    b_off = a_off + lay.matrix_rows(max_rank, w_in) + rng.integers(0, 12, s)
    b_off = -(-b_off // b_al) * b_al
    rows_needed = int(b_off.max()) + lay.matrix_rows(max_rank, w_out)
    pa = pages_per_slot or -(-rows_needed // page_size)
    num_pages = s * pa + spare_pages
    perm = rng.permutation(num_pages)
    slot_pages = jnp.asarray(perm[:s * pa].reshape(s, pa), jnp.int32)
    rows = _bf16(rng, (num_pages * page_size, h))
    return dict(
        rows=rows, slot_pages=slot_pages,
        a_offset=jnp.asarray(a_off, jnp.int32), b_offset=jnp.asarray(b_off, jnp.int32),
        rank=jnp.asarray(ranks, jnp.int32),
        scale=jnp.asarray(2.0 ** rng.integers(-2, 2, s), jnp.float32),
        token_slot=jnp.asarray(token_slot, jnp.int32),
        x=_bf16(rng, (t, w_in)),
        xa=_bf16(rng, (t, max_rank)).astype(jnp.float32),
        max_rank=max_rank, page_size=page_size)


def check_shrink(c, config=lora.TuningConfig(), interpret=None):
    lora_mgpu._warned.clear()
    args = (c["x"], c["rows"], c["slot_pages"], c["a_offset"], c["rank"], c["token_slot"])
    opts = dict(max_rank=c["max_rank"], page_size=c["page_size"])
    got = np.asarray(lora.lora_shrink(*args, **opts, backend="pallas", config=config,
                                      interpret=interpret))
    ref = np.asarray(lora.lora_shrink_reference(*args, **opts))
    assert not lora_mgpu._warned, "the kernel fell back to the reference"
    assert got.shape == ref.shape and not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-2)


def check_expand(c, out_features, fallback=False, config=lora.TuningConfig(), interpret=None):
    lora_mgpu._warned.clear()
    rows = c["rows"]
    args = (c["xa"], rows, c["slot_pages"], c["b_offset"], c["rank"], c["scale"],
            c["token_slot"])
    opts = dict(out_features=out_features, page_size=c["page_size"])
    # Wait for the interpreted kernel before dispatching the reference (see check_modules).
    got = jax.block_until_ready(lora.lora_expand(*args, **opts, backend="pallas",
                                                 config=config, interpret=interpret))
    ref = np.asarray(lora.lora_expand_reference(*args, **opts))
    assert bool(lora_mgpu._warned) == fallback, "unexpected (lack of) fallback"
    assert got.dtype == jnp.float32
    got = np.asarray(got)
    assert got.shape == ref.shape and not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-2)


H = 128          # smallest row the kernels take: one 64-wide swizzle tile, twice


def _batch(rng, kind, t, s, max_rank):
    """token_slot and ranks for one of the batch shapes the issue lists."""
    if kind == "one_token":
        return [0], [1]
    if kind == "no_adapters":
        return [-1] * t, rng.integers(1, max_rank + 1, s)
    if kind == "one_adapter":
        return [0] * t, [max_rank] + [1] * (s - 1)
    if kind == "all_distinct":
        return rng.permutation(s)[:t], rng.integers(1, max_rank + 1, s)
    if kind == "mixed":                   # some tokens without adapter, ranks incl. 0
        return rng.integers(-1, s, t), rng.choice([0, 1, 8, max_rank], s)
    raise ValueError(kind)


KINDS = ["one_token", "no_adapters", "one_adapter", "all_distinct", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_matches_reference(kind):
    rng = np.random.default_rng()
    t, s, r = (1, 1, 16) if kind == "one_token" else (12, 12, 16)
    ts, ranks = _batch(rng, kind, t, s, r)
    check_shrink(lora_case(rng, h=H, t=len(ts), s=len(ranks), max_rank=r, ranks=ranks,
                           token_slot=ts))


@pytest.mark.parametrize("kind", KINDS)
def test_expand_matches_reference(kind):
    rng = np.random.default_rng()
    t, s, r = (1, 1, 16) if kind == "one_token" else (12, 12, 16)
    ts, ranks = _batch(rng, kind, t, s, r)
    check_expand(lora_case(rng, h=H, t=len(ts), s=len(ranks), max_rank=r, ranks=ranks,
                           token_slot=ts), H)


@pytest.mark.parametrize("width,splits", [(320, 3), (192, 2), (320, None)])
def test_expand_ragged_splits(width, splits):
    """Splits that do not divide the expand's N steps (W = 320 in rows of H = 128: five
    steps of 64 columns; three splits take 2, 2 and 1), explicit or chosen, write every
    column; a count that leaves a split empty is refused."""
    rng = np.random.default_rng()
    ts, ranks = _batch(rng, "mixed", 24, 6, 16)
    c = lora_case(rng, h=H, t=len(ts), s=len(ranks), max_rank=16, ranks=ranks,
                  token_slot=ts, widths=(H, width))
    if splits is None:
        assert lora_mgpu._expand_splits(width // 64, 4) == 3      # 2 + 2 + 1 N steps
    assert lora_mgpu._expand_splits(43, 8) == 8     # 43 N steps (W = 11008): 6 per split
    assert lora_mgpu._expand_splits(56, 8) == 8 and lora_mgpu._expand_splits(44, 8) == 4
    check_expand(c, width, config=lora.TuningConfig(expand_splits=splits))
    with pytest.raises(ValueError, match="expand_splits: 4 splits of 5 N steps of 64 columns"):
        check_expand(c, 320, config=lora.TuningConfig(expand_splits=4))


def multi_case(rng, *, h, t, s, max_rank, ranks, out_widths, token_slot, page_size=8):
    """A pool whose `s` slots each hold M = len(out_widths) A^T [r, h] / B [r, out_m]
    pairs (q/k/v-like: one input, several outputs), at random aligned offsets inside
    the slot's randomly scattered pages; ranks: [s, M] (0: the slot skips the module)."""
    lay = PoolLayout(num_layers=1, num_pages=1, page_size=page_size, row_width=h,
                     num_kv_heads=1, head_dim=h, max_rank=max_rank, module_shapes=())
    n_mod = len(out_widths)
    a_off, b_off = np.zeros((s, n_mod), np.int64), np.zeros((s, n_mod), np.int64)
    end = np.zeros(s, np.int64)
    for j, w in enumerate(out_widths):
        a_al, b_al = matrix_align(h, h), matrix_align(w, h)
        a = -(-(end + rng.integers(0, 12, s)) // a_al) * a_al
        b = -(-(a + lay.matrix_rows(max_rank, h) + rng.integers(0, 12, s)) // b_al) * b_al
        a_off[:, j], b_off[:, j] = a, b
        end = b + lay.matrix_rows(max_rank, w)
    pa = -(-int(end.max()) // page_size)
    num_pages = s * pa + 8
    slot_pages = jnp.asarray(rng.permutation(num_pages)[:s * pa].reshape(s, pa), jnp.int32)
    return dict(rows=_bf16(rng, (num_pages * page_size, h)), slot_pages=slot_pages,
                a_offsets=jnp.asarray(a_off, jnp.int32), b_offsets=jnp.asarray(b_off, jnp.int32),
                ranks=jnp.asarray(ranks, jnp.int32),
                scales=jnp.asarray(2.0 ** rng.integers(-2, 2, (s, n_mod)), jnp.float32),
                token_slot=jnp.asarray(token_slot, jnp.int32), x=_bf16(rng, (t, h)),
                max_rank=max_rank, page_size=page_size, out_widths=tuple(out_widths))


def grouped_slots(ts, s):
    """token_slot ordered by slot, no-adapter tokens last (as the decode step orders
    its rows when its plan is grouped)."""
    ts = np.asarray(ts)
    return ts[np.argsort(np.where(ts >= 0, ts, s), kind="stable")]


def group_plan_of(c, *, grouped=False, prefill=False, config=lora.TuningConfig(),
                  pallas=True):
    """The `LoraPlan` of a multi_case's module group, as a step builds it."""
    ts, pages = c["token_slot"], c["slot_pages"]
    tokens = lora.token_plan(ts, pages.shape[0], prefill=prefill, grouped=grouped,
                             config=config) if pallas else None
    return lora.make_plan(ts, pages, c["a_offsets"], c["b_offsets"], c["ranks"], c["scales"],
                          widths=c["out_widths"], k_in=c["x"].shape[1],
                          max_rank=c["max_rank"], page_size=c["page_size"],
                          rows_shape=c["rows"].shape, tokens=tokens)


def check_apply(c, plan, config=lora.TuningConfig()):
    """`lora_apply` on `plan` (its kernels, no fallback) against the reference plan's."""
    lora_mgpu._warned.clear()
    # Wait for the interpreted kernels before dispatching more: their callbacks run jnp
    # ops on other threads, and eager dispatch beside them can deadlock on the CPU client.
    got = jax.block_until_ready(lora.lora_apply(c["x"], c["rows"], plan, config))
    ref = lora.lora_apply(c["x"], c["rows"], plan.replace(kernel=None))
    assert not lora_mgpu._warned, "the kernel fell back to the reference"
    for g, r, w in zip(got, ref, c["out_widths"]):
        assert g.dtype == jnp.float32
        g, r = np.asarray(g), np.asarray(r)
        assert g.shape == r.shape == (c["x"].shape[0], w) and not np.isnan(g).any()
        # End to end, both paths round scale·xa to bf16, and an f32 xa that differs in
        # its last bits may round to the neighbouring bf16 value: one flip moves an
        # output by up to 2^-8 of its largest term. A wrong matrix is off by ~|r|.
        np.testing.assert_allclose(g, r, rtol=2e-3, atol=2 ** -7 * max(1.0, np.abs(r).max()))


def check_modules(c, grouped=False):
    """The fused kernels against each module's reference, stage by stage (tight: the
    same bf16-exact inputs), then `lora_apply` end to end (one shrink launch, one
    expand launch per width) against the per-module reference. grouped: the tokens
    come ordered by slot and the plan is grouped."""
    lora_mgpu._warned.clear()
    mods, widths = range(len(c["out_widths"])), c["out_widths"]
    pages, ts = c["slot_pages"], c["token_slot"]
    opts = dict(max_rank=c["max_rank"], page_size=c["page_size"])
    plan = group_plan_of(c, grouped=grouped)
    cfg = lora.TuningConfig()
    xa = np.asarray(lora_mgpu.lora_shrink(c["x"], c["rows"], plan.kernel, cfg))
    for j in mods:
        ref = lora.lora_shrink_reference(c["x"], c["rows"], pages, c["a_offsets"][:, j],
                                         c["ranks"][:, j], ts, **opts)
        np.testing.assert_allclose(xa[j], np.asarray(ref), rtol=1e-4, atol=1e-2)
    # The expand on bf16-exact xa (as the single-module checks): one launch per width.
    xa_in = _bf16(np.random.default_rng(), xa.shape).astype(jnp.float32)
    got = jax.block_until_ready(lora_mgpu.lora_expand(xa_in, c["rows"], plan.kernel, cfg))
    for j, w in enumerate(widths):
        ref = lora.lora_expand_reference(xa_in[j], c["rows"], pages, c["b_offsets"][:, j],
                                         c["ranks"][:, j], c["scales"][:, j], ts,
                                         out_features=w, page_size=c["page_size"])
        assert got[j].shape == (len(ts), w) and not np.isnan(np.asarray(got[j])).any()
        np.testing.assert_allclose(np.asarray(got[j]), np.asarray(ref), rtol=1e-4, atol=1e-2)
    check_apply(c, plan)


@pytest.mark.parametrize("kind,max_rank,widths,grouped", [
    ("mixed", 16, (H, H, H), False),              # MHA q/k/v: one shrink, one expand
    pytest.param("all_distinct", 64, (H, H // 2, H // 2), False,  # GQA: 192 shrink rows;
                 marks=pytest.mark.slow),         # expands q, then k|v (rank-64 row tiles:
                                                  # test_max_rank_128_spans_two_row_tiles;
                                                  # GQA widths: the grouped case below)
    pytest.param("one_adapter", 8, (H, H), False,  # gate/up-like pair
                 marks=pytest.mark.slow),
    ("no_adapters", 16, (H, H, H), False),
    ("mixed", 16, (H, H // 2, H // 2), True)])    # tokens ordered by slot: grouped tiles
def test_fused_modules_match_reference(kind, max_rank, widths, grouped):
    rng = np.random.default_rng()
    ts, _ = _batch(rng, kind, 12, 12, max_rank)
    if grouped:
        ts = grouped_slots(ts, 12)
    ranks = rng.choice([0, 1, 5, 8, max_rank], (12, len(widths)))
    c = multi_case(rng, h=H, t=len(ts), s=12, max_rank=max_rank, ranks=ranks,
                   out_widths=widths, token_slot=ts)
    check_modules(c, grouped=grouped)


# Prompt-like runs across tiles also run in the default suite inside the Pallas prefill
# step (tests/test_pallas_step.py), whose small batches take the unsorted plan.
@pytest.mark.parametrize("kind", ["mixed", "all_distinct",
                                  pytest.param("segments", marks=pytest.mark.slow)])
def test_unsorted_plan_matches_reference(kind):
    """Tiles of the tokens in their own order: a tile mixes slots, each token takes only
    its own slot's rows, and the output needs no un-sort. Edge: a last partial tile."""
    rng = np.random.default_rng()
    if kind == "segments":                        # prefill-like: runs across tiles
        ts = np.repeat(rng.permutation(4) - 1, [9, 3, 14, 5])
        ranks = [16, 3, 8, 16]
    else:
        ts, ranks = _batch(rng, kind, 13, 12, 16)
    c = lora_case(rng, h=H, t=len(ts), s=len(ranks), max_rank=16, ranks=ranks,
                  token_slot=ts)
    check_shrink(c)
    check_expand(c, H)


def test_max_rank_128_spans_two_row_tiles():
    """Rank 128 covers 16 row groups: the kernels' 128-row path (two 64-row halves,
    the second skipped for slots of rank <= 64)."""
    rng = np.random.default_rng()
    ts = rng.integers(0, 3, 6)
    c = lora_case(rng, h=H, t=6, s=3, max_rank=128, ranks=[128, 64, 1], token_slot=ts)
    check_shrink(c)
    check_expand(c, H)


@pytest.mark.parametrize("h,f", [(H, 3 * H // 2), (2 * H, 3 * H)])
def test_mlp_widths_read_column_chunks(h, f):
    """gate/up B and the down A^T: widths F that neither divide nor are multiples of H
    are stored in gcd(F, H)-column chunks; the kernels read each chunk's rank rows."""
    rng = np.random.default_rng()
    ts = rng.integers(-1, 4, 10)
    ranks = [16, 3, 8, 0]
    down = lora_case(rng, h=h, t=10, s=4, max_rank=16, ranks=ranks, token_slot=ts,
                     widths=(f, h))
    check_shrink(down)                              # down: A^T of width F
    up = lora_case(rng, h=h, t=10, s=4, max_rank=16, ranks=ranks, token_slot=ts,
                   widths=(h, f))
    check_expand(up, f)                             # gate/up: B of width F


def test_expand_narrow_width_packs_rank_rows():
    """A k/v B of width kv_size = H/2: two rank rows per pool row, read via a view."""
    rng = np.random.default_rng()
    ts = rng.integers(-1, 4, 10)
    c = lora_case(rng, h=2 * H, t=10, s=4, max_rank=16, ranks=[16, 1, 8, 0], token_slot=ts,
                  widths=(2 * H, H))
    check_expand(c, H, config=lora.TuningConfig(block_n=64))


def test_prefill_segments_span_token_tiles():
    """MBGMM: segments of many tokens per adapter cross tile boundaries."""
    rng = np.random.default_rng()
    ts = np.repeat(rng.permutation(3), [7, 13, 4])
    c = lora_case(rng, h=H, t=len(ts), s=3, max_rank=16, ranks=[16, 3, 8], token_slot=ts)
    check_shrink(c, config=lora.TuningConfig(decode_block_tokens=8))
    check_expand(c, H)


@pytest.mark.parametrize("max_rank,t", [pytest.param(64, 40, marks=pytest.mark.slow), (16, 3)])
def test_balanced_shrink_matches_reference(max_rank, t):
    """The shrink's chunks cut evenly over its blocks whatever their tiles: tiles of
    very different rank rows (as 4 requests per adapter with ranks cycling 8..64 give,
    grouped as the decode step groups them), and a batch with fewer chunks than blocks;
    through the step's plan, end to end, and the shrink alone."""
    rng = np.random.default_rng()
    s = 10
    grouped = t > s
    ts = np.repeat(np.arange(s), 4)[:t] if grouped else rng.integers(-1, s, t)
    ranks = np.array([[8, 16, 32, 64, 1, 0, 5, 64, 16, 8][j] for j in range(s)])
    ranks = np.minimum(np.stack([ranks, ranks[::-1], ranks], 1), max_rank)
    widths = (H, H // 2, H // 2)
    c = multi_case(rng, h=H, t=len(ts), s=s, max_rank=max_rank, ranks=ranks,
                   out_widths=widths, token_slot=ts)
    opts = dict(max_rank=max_rank, page_size=c["page_size"])
    plan = group_plan_of(c, grouped=grouped)
    check_apply(c, plan)
    xa = np.asarray(lora_mgpu.lora_shrink(c["x"], c["rows"], plan.kernel, lora.TuningConfig()))
    for j in range(3):
        want = lora.lora_shrink_reference(c["x"], c["rows"], c["slot_pages"],
                                          c["a_offsets"][:, j], c["ranks"][:, j],
                                          c["token_slot"], **opts)
        np.testing.assert_allclose(xa[j], np.asarray(want), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("bt", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_wide_token_tiles_match_reference(bt):
    """Tiles of 64+ tokens (long prefill segments): the expand computes xs · B in the
    stored [tokens, n] orientation, with no transpose; also through a prefill step's plan."""
    rng = np.random.default_rng()
    segs = [70, 5, 90, 33]
    ts = np.repeat(rng.permutation(4) - 1, segs)                   # base-only segment too
    c = lora_case(rng, h=H, t=len(ts), s=3, max_rank=16, ranks=[16, 3, 9], token_slot=ts)
    cfg = lora.TuningConfig(decode_block_tokens=bt)
    check_shrink(c, config=cfg)
    check_expand(c, H, config=dataclasses.replace(cfg, expand_stages=2))
    m = multi_case(rng, h=H, t=len(ts), s=3, max_rank=16,
                   ranks=rng.choice([0, 3, 9, 16], (3, 2)), out_widths=(H, H // 2),
                   token_slot=ts)
    cfg = lora.TuningConfig(prefill_block_tokens=bt)
    plan = group_plan_of(m, prefill=True, config=cfg)
    assert plan.kernel.tokens.block_tokens == bt and not plan.kernel.tokens.grouped
    check_apply(m, plan, cfg)


def test_stage_refills_are_race_free():
    """More K/N steps than pipeline stages, under the interpreter's race detector."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    rng = np.random.default_rng()
    ts = np.repeat(rng.permutation(3), [5, 9, 2])
    c = lora_case(rng, h=2 * H, t=len(ts), s=3, max_rank=16, ranks=[16, 5, 9], token_slot=ts)
    races = plgpu.InterpretGPUParams(detect_races=True)
    check_shrink(c, config=lora.TuningConfig(shrink_stages=2), interpret=races)
    assert not mgpu_interpret.get_races().races_found
    check_shrink(c, config=lora.TuningConfig(shrink_stages=2, decode_block_tokens=8),
                 interpret=races)
    assert not mgpu_interpret.get_races().races_found
    check_expand(c, 2 * H, config=lora.TuningConfig(block_n=64, expand_stages=2),
                 interpret=races)
    assert not mgpu_interpret.get_races().races_found
    layout, args = attn_case(rng, nkv=2, g=2, hd=64, page_size=8, row_width=256, batch=2,
                             pages_per_req=40, lengths=[300, 129])
    check_decode(layout, args, block_kv=64, num_splits=2, num_stages=2, interpret=races)
    assert not mgpu_interpret.get_races().races_found


def test_grouped_plan_covers_each_token_once():
    """Tokens ordered by slot: each item is one slot's run inside one tile, and every
    token belongs to exactly one item, its own."""
    rng = np.random.default_rng()
    t, s, bt = 37, 9, 8
    ts = grouped_slots(rng.integers(-1, s, t), s)
    tp = jax.tree.map(np.asarray, lora_plan.plan_tokens(jnp.asarray(ts, jnp.int32), s, bt,
                                                        grouped=True))
    assert tp.grouped and len(tp.item_lo) == lora_plan.num_items_bound(t, s, bt, True)
    key = np.where(ts >= 0, ts, s)
    assert (tp.key == key).all()
    owned = np.zeros(t, int)
    for w in range(len(tp.item_lo)):
        lo, hi = tp.item_lo[w], tp.item_hi[w]
        owned[lo:hi] += 1
        if hi > lo:
            assert lo // bt == tp.item_tile[w] == (hi - 1) // bt
            assert (key[lo:hi] == tp.item_slot[w]).all()
            assert (tp.pos_item[lo:hi] == w).all()
    assert (owned == 1).all()
    order, where = map(np.asarray, lora.slot_order(jnp.asarray(rng.integers(-1, s, t)), s))
    assert (where[order] == np.arange(t)).all()


def test_unsorted_plan_items_are_the_distinct_tile_slot_pairs():
    rng = np.random.default_rng()
    t, s, bt = 37, 9, 8
    ts = rng.integers(-1, s, t)
    ts[8:16] = 3                                    # a tile of one slot
    tp = jax.tree.map(np.asarray, lora_plan.plan_tokens(jnp.asarray(ts, jnp.int32), s, bt,
                                                        grouped=False))
    assert not tp.grouped
    key = np.where(ts >= 0, ts, s)
    assert (tp.key == key).all()
    pairs = sorted({(p // bt, int(key[p])) for p in range(t)})
    used = tp.item_hi > tp.item_lo
    assert len(tp.item_lo) == lora_plan.num_items_bound(t, s, bt, False)
    got = list(zip(tp.item_tile[used].tolist(), tp.item_slot[used].tolist()))
    assert got == pairs                             # each pair once, in tile order
    assert not used[len(pairs):].any()
    for p in range(t):                              # each token's item is its own pair
        w = tp.pos_item[p]
        assert (tp.item_tile[w], tp.item_slot[w]) == (p // bt, key[p])
        assert tp.item_lo[w] <= p < tp.item_hi[w]


def test_token_plan_picks_tiles_and_order_by_phase():
    """The step's plan choice (`TuningConfig`): by default prefill runs 64-token tiles
    (the wide expand) and is never sorted; decode groups its tokens above 32 and uses
    tiles of at most 32; given values override either phase."""
    def tiles(t, s, **kw):
        return lora.token_plan(jnp.arange(t, dtype=jnp.int32) % s, s, **kw).block_tokens
    assert tiles(4096, 4, prefill=True) == 64
    assert tiles(4096, 4) == 32 and lora.sorts_tokens(4096)   # decode-sized slots
    assert tiles(128, 128) == 8 and lora.sorts_tokens(128)
    assert tiles(32, 32) == 8 and not lora.sorts_tokens(32)
    assert tiles(16, 16, prefill=True) == 8         # one token per slot: small tiles
    cfg = lora.TuningConfig(prefill_block_tokens=32, decode_block_tokens=128,
                            unsorted_max_tokens=0)
    assert tiles(4096, 4, prefill=True, config=cfg) == 32
    assert tiles(4096, 4, config=cfg) == 128 and lora.sorts_tokens(8, cfg)


@pytest.mark.parametrize("grouped", [True, False])
def test_group_plan_packs_each_group_once_inside_its_tile(grouped):
    """The packing: every (item, module, 8-row group) below the slot's rank has one packed
    place, inside its own tile's chunks, holding that group's pool row; every other place
    holds the past-the-pool row (TMA zero fill); the expand's inverse map agrees."""
    rng = np.random.default_rng()
    t, s, bt, max_rank = 29, 7, 8, 24
    ts = rng.integers(-1, s, t)
    if grouped:
        ts = grouped_slots(ts, s)
    widths = (H, H // 2)
    c = multi_case(rng, h=H, t=t, s=s, max_rank=max_rank,
                   ranks=rng.choice([0, 1, 8, 9, max_rank], (s, 2)), out_widths=widths,
                   token_slot=ts)
    n_rows = c["rows"].shape[0]
    gp = group_plan_of(c, grouped=grouped, config=lora.TuningConfig(decode_block_tokens=bt)
                       ).kernel
    assert gp.tokens.grouped == grouped and gp.tokens.block_tokens == bt
    tp = jax.tree.map(np.asarray, gp.tokens)
    ranks = np.asarray(c["ranks"])
    starts, pos, rows = map(np.asarray, (gp.s_starts, gp.s_pos, gp.s_rows))
    assert (np.diff(starts) >= 0).all() and starts[-1] <= gp.s_bound
    seen = np.zeros(gp.s_bound * 8, bool)
    for w in range(len(tp.item_lo)):
        slot = tp.item_slot[w]
        if tp.item_hi[w] <= tp.item_lo[w] or slot >= s:
            continue
        tile = tp.item_tile[w]
        for m in range(2):
            want = np.asarray(lora_plan._group_rows(
                c["slot_pages"], c["a_offsets"][:, m], c["ranks"][:, m],
                jnp.asarray([slot], jnp.int32), num_groups=max_rank // 8 + 1, chunks=1,
                per=1, page_size=8, num_rows=n_rows))[0, 0]
            for g in range(-(-ranks[slot, m] // 8)):
                p = pos[w, m] + g
                assert starts[tile] * 8 <= p < starts[tile + 1] * 8 and not seen[p]
                seen[p] = True
                assert rows[p, 0] == want[g] < n_rows
    assert (rows[~seen, 0] == n_rows).all()
    e_item, e_group = np.asarray(gp.e_item), np.asarray(gp.e_group)
    for m in range(2):
        live = e_item[m] >= 0
        assert live.sum() == sum(-(-ranks[tp.item_slot[w], m] // 8)
                                 for w in set(e_item[m][live].tolist()))
        assert (e_group[m][live] * 8 < ranks[tp.item_slot[e_item[m][live]], m]).all()


@pytest.mark.parametrize("grouped,splits", [(True, 3), (False, 1), (False, 16)])
def test_xs_tables_agree_with_the_index_path(grouped, splits):
    """The expand's xs built from the GroupPlan's per-step tables (`_xs_tables`) equals
    the one the index arithmetic builds per element (`_xs_index`, what the expand half
    reads), bit for bit, for each width group, on random shrink partial sums of `splits`
    K splits."""
    rng = np.random.default_rng()
    t, s, max_rank = 37, 6, 24
    widths = (H, H // 2, H // 2)
    ts = rng.integers(-1, s, t)
    c = multi_case(rng, h=H, t=t, s=s, max_rank=max_rank,
                   ranks=rng.choice([0, 1, 8, 9, max_rank], (s, 3)), out_widths=widths,
                   token_slot=grouped_slots(ts, s) if grouped else ts)
    cfg = lora.TuningConfig(decode_block_tokens=8)
    arrays = {k: v for k, v in c.items() if isinstance(v, jax.Array)}
    gp = jax.jit(lambda a: group_plan_of(c | a, grouped=grouped, config=cfg).kernel)(arrays)
    assert len(gp.xs_tabs) == len(lora_plan.width_groups(widths)) == 2
    out_s = jnp.asarray(rng.standard_normal((splits, gp.s_bound, 64, gp.tokens.block_tokens)),
                        jnp.float32)

    def by_index(gp, out_s, mods):
        og = out_s.reshape(out_s.shape[0], gp.s_bound * 8, 8, gp.tokens.block_tokens)
        ix = lora_plan._xs_index(gp, mods)
        src = gp.s_pos[ix["w"], ix["m"]] + ix["grp"]               # packed shrink group
        vals = lora_plan.split_sum(og, src, ix["rr"], ix["col"])
        xs = jnp.where(ix["live"], vals * ix["scale"], 0.0).astype(jnp.float32)
        return xs.reshape(len(mods), gp.e_bound, gp.tokens.block_tokens, 64)
    for mods in lora_plan.width_groups(widths).values():
        got = np.asarray(jax.jit(lambda g, o, mods=mods: lora_plan.xs_from_shrink(
            g, o, mods, jnp.float32))(gp, out_s))
        want = np.asarray(jax.jit(lambda g, o, mods=mods: by_index(g, o, mods))(gp, out_s))
        assert got.shape == (len(mods), gp.e_bound, gp.tokens.block_tokens, 64)
        assert (want != 0).any()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("splits", [1, 2, 7, 32])
def test_split_sum_is_the_indexed_sum_over_splits(splits):
    """`split_sum` (one flat index shared by the K splits, one gather per split) equals
    numpy's og[:, src, rr, col].sum(0) on random partial sums and random broadcast
    indices, to f32 rounding."""
    rng = np.random.default_rng()
    og = rng.standard_normal((splits, 13, 8, 16)).astype(np.float32)
    src = rng.integers(0, 13, (3, 5, 1, 8, 1)).astype(np.int32)
    rr = np.arange(8, dtype=np.int32).reshape(1, 1, 1, 1, 8)
    col = rng.integers(0, 16, (1, 1, 16, 1, 1)).astype(np.int32)
    got = np.asarray(jax.jit(lora_plan.split_sum)(og, src, rr, col))
    want = og[:, src, rr, col].sum(0)
    assert got.shape == (3, 5, 16, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * splits)


def test_unsupported_width_falls_back_with_a_log(caplog):
    rng = np.random.default_rng()
    c = lora_case(rng, h=H, t=4, s=2, max_rank=8, ranks=[8, 4], token_slot=[0, 1, 1, -1])
    w = 5 * H // 4                                # column chunks of gcd(160, 128) = 32
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.lora_mgpu"):
        check_expand(c, w, fallback=True)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.lora_mgpu"):
        lora.lora_expand(c["xa"], c["rows"], c["slot_pages"], c["b_offset"], c["rank"],
                         c["scale"], c["token_slot"], out_features=w,
                         page_size=c["page_size"], backend="pallas")
    msgs = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(msgs) == 1                      # said once, not on every call


# --- decode attention ---------------------------------------------------------------

def attn_case(rng, *, nkv, g, hd, page_size, row_width, batch, pages_per_req, lengths=None):
    layout = PoolLayout(num_layers=1, num_pages=batch * pages_per_req + 4, page_size=page_size,
                        row_width=row_width, num_kv_heads=nkv, head_dim=hd, max_rank=8,
                        module_shapes=())
    tpp = layout.tokens_per_page
    layer = _bf16(rng, (layout.num_pages, page_size, row_width))
    kv_pages = jnp.asarray(rng.permutation(layout.num_pages)[:batch * pages_per_req]
                           .reshape(batch, pages_per_req), jnp.int32)
    if lengths is None:
        lengths = rng.integers(1, pages_per_req * tpp + 1, batch)
    q = _bf16(rng, (batch, nkv * g, hd))
    return layout, (q, layer, kv_pages, jnp.asarray(lengths, jnp.int32))


def check_decode(layout, args, window=None, **kw):
    paged_attention_mgpu._warned.clear()
    got = np.asarray(paged_attention_mgpu.decode_attention(*args, layout, window, **kw))
    ref = np.asarray(paged_attention.decode_attention_reference(*args, layout, window))
    assert not paged_attention_mgpu._warned, "the kernel fell back to the reference"
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, atol=2e-2 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("nkv,g,window,splits,heads", [
    (2, 1, None, 1, 2), (2, 3, None, 2, 2), (2, 4, 40, 3, 2),
    (4, 1, None, 2, 2),       # two groups of two KV heads per request
    (2, 9, None, 1, 2),       # 16 query rows per KV head
    (2, 1, None, 2, 1),       # one KV head per block
    (2, 4, None, None, None)])  # the default tiling
def test_decode_attention_matches_reference(nkv, g, window, splits, heads):
    rng = np.random.default_rng()
    # KV heads of 64, page rows of 128 * nkv: 8 tokens per page, 64-token steps of 8 pages.
    layout, args = attn_case(rng, nkv=nkv, g=g, hd=64, page_size=8, row_width=128 * nkv,
                             batch=3, pages_per_req=20,
                             lengths=[1, 64, int(rng.integers(65, 161))])
    check_decode(layout, args, window, block_kv=None if heads is None else 64,
                 num_splits=splits, heads_per_block=heads)


@pytest.mark.parametrize("bsz,nkv,rows_q,steps", [
    (1, 32, 8, 32), (16, 32, 8, 32), (32, 32, 8, 4), (256, 32, 8, 2), (1, 8, 8, 32),
    (8, 8, 8, 64), (64, 8, 8, 32), (3, 2, 16, 3), (1, 4, 64, 1), (2, 6, 8, 100)])
def test_decode_tiling_fills_the_gpu(bsz, nkv, rows_q, steps):
    """Heads per block divide n_kv and fit 64 query rows; splits never exceed the steps;
    the blocks reach the target unless even one head and one step per block cannot."""
    hpb, splits = paged_attention_mgpu.decode_tiling(bsz, nkv, rows_q, steps)
    assert nkv % hpb == 0 and hpb * rows_q <= 64 and 1 <= splits <= steps
    blocks = bsz * (nkv // hpb) * splits
    assert blocks >= min(paged_attention_mgpu.TARGET_BLOCKS, bsz * nkv * steps)
    if splits > 1:
        assert hpb == 1       # heads are split before the context


def test_decode_tiling_refuses_bad_heads_per_block():
    with pytest.raises(ValueError, match="heads_per_block 3: must divide 8 KV heads"):
        paged_attention_mgpu.decode_tiling(4, 8, 8, 16, heads_per_block=3)
    with pytest.raises(ValueError, match="at most 64 query rows"):
        paged_attention_mgpu.decode_tiling(4, 8, 16, 16, heads_per_block=8)
    assert paged_attention_mgpu.decode_tiling(4, 8, 16, 16, heads_per_block=4)[0] == 4


# --- on the GPU, at model shapes ------------------------------------------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_rank", [16, 64])
def test_gpu_lora_llama7b_shapes(kind, max_rank):
    rng = np.random.default_rng()
    t = s = 1 if kind == "one_token" else 64
    ts, ranks = _batch(rng, kind, t, s, max_rank)
    c = lora_case(rng, h=4096, t=len(ts), s=len(ranks), max_rank=max_rank, ranks=ranks,
                  token_slot=ts, page_size=16, spare_pages=64)
    check_shrink(c)
    check_expand(c, 4096)
    check_expand(c, 1024)                       # Llama-3-8B k/v B: 4 rank rows per pool row


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("f", [11008, 14336])
def test_gpu_lora_mlp_widths(f):
    """Llama-7B / Llama-3-8B MLP: down A^T [r, F] and gate/up B [r, F] in column chunks."""
    rng = np.random.default_rng()
    ts, ranks = _batch(rng, "mixed", 64, 64, 64)
    for widths, side in (((f, 4096), "down"), ((4096, f), "up")):
        c = lora_case(rng, h=4096, t=len(ts), s=len(ranks), max_rank=64, ranks=ranks,
                      token_slot=ts, page_size=16, spare_pages=64, widths=widths)
        if side == "down":
            check_shrink(c)
        else:
            check_expand(c, f)
            # ragged: 43 or 56 N steps, 5 splits
            check_expand(c, f, config=lora.TuningConfig(expand_splits=5))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("widths", [(4096, 4096, 4096), (4096, 1024, 1024), (14336, 14336)])
def test_gpu_fused_modules(widths):
    """Llama-7B q/k/v, Llama-3-8B q/k/v (GQA) and gate/up: one shrink launch, one expand
    per width, at max_rank 64 (the q/k/v shrink's wgmma has 192 rows)."""
    rng = np.random.default_rng()
    ts, _ = _batch(rng, "mixed", 128, 64, 64)
    ranks = rng.choice([0, 1, 8, 16, 64], (64, len(widths)))
    check_modules(multi_case(rng, h=4096, t=len(ts), s=64, max_rank=64, ranks=ranks,
                             out_widths=widths, token_slot=grouped_slots(ts, 64)),
                  grouped=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("t,widths", [(32, (4096, 4096, 4096)), (24, (4096, 1024, 1024))])
def test_gpu_unsorted_plan(t, widths):
    """The small-batch plan at Llama shapes: tokens left in their own order (tiles mix
    slots; no gathers around the kernels)."""
    rng = np.random.default_rng()
    ts, _ = _batch(rng, "mixed", t, 48, 64)
    ranks = rng.choice([0, 1, 8, 16, 64], (48, len(widths)))
    check_modules(multi_case(rng, h=4096, t=len(ts), s=48, max_rank=64, ranks=ranks,
                             out_widths=widths, token_slot=ts))


@pytest.mark.gpu
@gpu
def test_gpu_balanced_shrink():
    """Llama-7B q/k/v at B=128, 4 requests per adapter, ranks cycling 8..64 (tiles of 2
    and 5 chunks): the shrink with its chunks spread evenly over the blocks."""
    rng = np.random.default_rng()
    s, widths = 32, (4096, 4096, 4096)
    ts = np.repeat(np.arange(s), 4)
    ranks = np.repeat(np.array([8, 16, 32, 64] * 8)[:, None], 3, 1)
    c = multi_case(rng, h=4096, t=len(ts), s=s, max_rank=64, ranks=ranks, out_widths=widths,
                   token_slot=ts, page_size=16)
    opts = dict(max_rank=64, page_size=16)
    lora_mgpu._warned.clear()
    xa = np.asarray(lora_mgpu.lora_shrink(c["x"], c["rows"], group_plan_of(c, grouped=True).kernel,
                                          lora.TuningConfig()))
    assert not lora_mgpu._warned
    for j in range(3):
        want = lora.lora_shrink_reference(c["x"], c["rows"], c["slot_pages"],
                                          c["a_offsets"][:, j], c["ranks"][:, j],
                                          c["token_slot"], **opts)
        np.testing.assert_allclose(xa[j], np.asarray(want), rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
@gpu
def test_gpu_lora_prefill_segments():
    rng = np.random.default_rng()
    ts = np.repeat(rng.permutation(5), [300, 7, 130, 64, 1])
    c = lora_case(rng, h=4096, t=len(ts), s=5, max_rank=64, ranks=[64, 8, 16, 33, 1],
                  token_slot=ts, page_size=16)
    check_shrink(c)
    check_expand(c, 4096)
    for bt in (64, 128):                        # wide tiles: xs · B
        check_shrink(c, config=lora.TuningConfig(decode_block_tokens=bt))
        check_expand(c, 4096, config=lora.TuningConfig(decode_block_tokens=bt))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nkv,g,window", [(32, 1, None), (8, 4, None), (8, 4, 1000)])
def test_gpu_decode_attention_llama_shapes(nkv, g, window):
    rng = np.random.default_rng()
    layout, args = attn_case(rng, nkv=nkv, g=g, hd=128, page_size=16, row_width=4096,
                             batch=16, pages_per_req=4096 // (16 * 4096 // (2 * nkv * 128)))
    check_decode(layout, args, window)
