"""The LoRA op's static configuration (`TuningConfig`) and its per-step plan (`LoraPlan`):
what they accept, and that the plan is a pytree a jitted step can build, return and take.
No kernel runs here (test_kernels.py compares the kernels with the reference)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lora
from pallas_kernels.lora_plan import GroupPlan, TokenPlan, num_items_bound

H, PAGE_SIZE, MAX_RANK = 128, 8, 16


def test_tuning_config_defaults_are_the_measured_choices_and_hashable():
    """The defaults benchmarks/PERF.md records, and a config is a static jit argument."""
    cfg = lora.TuningConfig()
    assert (cfg.decode_block_tokens, cfg.prefill_block_tokens, cfg.unsorted_max_tokens) == (
        32, 64, 32)
    assert (cfg.shrink_blocks, cfg.expand_blocks) == (132, 4 * 132)
    assert (cfg.stage_bytes, cfg.smem_bytes) == (40 << 10, 110 << 10)
    assert hash(cfg) == hash(lora.TuningConfig()) and cfg == lora.TuningConfig()
    assert cfg != lora.TuningConfig(shrink_blocks=66)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shrink_blocks = 1


@pytest.mark.parametrize("field,bad", [
    ("decode_block_tokens", 48), ("prefill_block_tokens", 256), ("decode_block_tokens", None),
    ("block_k", 96), ("block_n", 32), ("unsorted_max_tokens", -1),
    ("unsorted_max_tokens", 1.5), ("shrink_blocks", 0), ("expand_blocks", True),
    ("stage_bytes", None), ("smem_bytes", "110k"), ("shrink_splits", 0),
    ("expand_splits", -2), ("shrink_lanes", 2.0), ("shrink_stages", 0), ("expand_stages", "2")])
def test_tuning_config_refuses_a_bad_value_naming_its_field(field, bad):
    with pytest.raises(ValueError, match=f"TuningConfig.{field}: {bad!r} is not"):
        lora.TuningConfig(**{field: bad})


@pytest.mark.parametrize("field,good", [
    ("decode_block_tokens", 8), ("prefill_block_tokens", 128), ("block_k", 64),
    ("block_n", None), ("unsorted_max_tokens", 0), ("shrink_splits", 5),
    ("expand_stages", None)])
def test_tuning_config_takes_good_values(field, good):
    assert getattr(lora.TuningConfig(**{field: good}), field) == good


def _tables(rng, t, s, m):
    ts = rng.integers(-1, s, t)
    return dict(token_slot=jnp.asarray(ts, jnp.int32),
                slot_pages=jnp.asarray(rng.permutation(4 * s).reshape(s, 4), jnp.int32),
                a_offsets=jnp.zeros((s, m), jnp.int32),
                b_offsets=jnp.full((s, m), MAX_RANK, jnp.int32),
                ranks=jnp.asarray(rng.choice([0, 1, 8, MAX_RANK], (s, m)), jnp.int32),
                scales=jnp.ones((s, m), jnp.float32))


def _plan(tab, *, widths, pallas, grouped=False, prefill=False):
    s = tab["slot_pages"].shape[0]
    tokens = lora.token_plan(tab["token_slot"], s, prefill=prefill, grouped=grouped) \
        if pallas else None
    return lora.make_plan(**tab, widths=widths, k_in=H, max_rank=MAX_RANK,
                          page_size=PAGE_SIZE, rows_shape=(4 * s * PAGE_SIZE, H), tokens=tokens)


@pytest.mark.parametrize("pallas", [True, False])
def test_plan_round_trips_through_jit(pallas):
    """A plan built inside one jitted function comes out a pytree of arrays with its
    static fields kept, and goes into another unchanged: no Python object holds state."""
    rng = np.random.default_rng(0)
    tab = _tables(rng, 20, 6, 3)
    widths = (H, H // 2, H // 2)
    build = jax.jit(lambda tab: _plan(tab, widths=widths, pallas=pallas))
    plan = build(tab)
    assert isinstance(plan, lora.LoraPlan)
    assert (plan.widths, plan.max_rank, plan.page_size) == (widths, MAX_RANK, PAGE_SIZE)
    assert (plan.kernel is not None) == pallas
    leaves, treedef = jax.tree.flatten(plan)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = jax.jit(lambda p: p)(plan)
    assert jax.tree.structure(again) == treedef
    for a, b in zip(leaves, jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eager = _plan(tab, widths=widths, pallas=pallas)
    for a, b in zip(jax.tree.leaves(eager), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("grouped,prefill", [(False, False), (True, False), (False, True)])
def test_plan_fields_have_their_documented_shapes(grouped, prefill):
    t, s, m = 40, 6, 2
    rng = np.random.default_rng(1)
    tab = _tables(rng, t, s, m)
    if grouped:
        order, _ = lora.slot_order(tab["token_slot"], s)
        tab["token_slot"] = tab["token_slot"][order]
    widths = (H, H // 2)
    plan = _plan(tab, widths=widths, pallas=True, grouped=grouped, prefill=prefill)
    gp = plan.kernel
    assert isinstance(gp, GroupPlan) and isinstance(gp.tokens, TokenPlan)
    tp = gp.tokens
    bt = tp.block_tokens
    nt, w = -(-t // bt), num_items_bound(t, s, bt, grouped)
    assert (tp.grouped, tp.num_slots, tp.num_tokens, tp.num_tiles) == (grouped, s, t, nt)
    assert tp.key.shape == tp.pos_item.shape == (t,)
    assert tp.item_slot.shape == tp.item_tile.shape == tp.item_lo.shape == tp.item_hi.shape \
        == (w,)
    assert gp.ranks.shape == gp.scales.shape == (s, m)
    assert gp.s_starts.shape == (nt + 1,) and gp.s_pos.shape == (w, m)
    assert gp.s_rows.shape == (gp.s_bound * 8, 1) and gp.s_tile.shape == (gp.s_bound,)
    assert gp.e_starts.shape == (m, nt + 1) and gp.e_guard.shape == (m, nt)
    assert [r.shape for r in gp.e_rows] == [(1, gp.e_bound * 8, 1)] * 2   # two widths
    assert gp.e_item.shape == gp.e_group.shape == (m, gp.e_bound * 8)
    assert [x.shape for x in gp.xs_tabs] == [(6, 1, gp.e_bound * 8)] * 2
    assert [x.shape for x in gp.xs_scale] == [(1, gp.e_bound * 8)] * 2
    assert all(a.dtype == jnp.int32 for a in jax.tree.leaves(tp))


def test_shrink_or_expand_only_plans_have_no_other_half():
    tab = _tables(np.random.default_rng(2), 12, 3, 1)
    tokens = lora.token_plan(tab["token_slot"], 3)
    opts = dict(max_rank=MAX_RANK, page_size=PAGE_SIZE, rows_shape=(96, H), tokens=tokens)
    shrink = lora.make_plan(**(tab | dict(b_offsets=None)), widths=(), k_in=H, **opts).kernel
    assert shrink.e_starts is None and shrink.e_rows == () and shrink.xs_tabs == ()
    assert shrink.s_rows is not None
    expand = lora.make_plan(**(tab | dict(a_offsets=None)), widths=(H,), k_in=None,
                            **opts).kernel
    assert expand.s_rows is None and expand.s_bound == 0 and expand.xs_tabs == ()
    assert expand.e_rows[0].shape[0] == 1


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA backend 'mgpu'"):
        lora.resolve_backend("mgpu")
