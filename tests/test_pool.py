"""The unified pool: allocator properties (hypothesis), KV and adapter page writes, waste."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import TINY, tiny_engine_config
from pallas_kernels.lora_reference import gather_slot_matrix
from slora_jax.allocator import OutOfPages, PageAllocator, adapter_used_elems, kv_used_elems
from slora_jax.adapters import dummy_adapter
from slora_jax.config import MODULES, EngineConfig
from slora_jax.pool import (NULL_PAGE, PoolLayout, adapter_row_view, init_pool, kv_page_view,
                            load_adapter_pages, matrix_align, matrix_form, write_kv)


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free sequences: no page is handed out twice, all come back."""

    def __init__(self):
        super().__init__()
        self.a = PageAllocator(64)
        self.held: dict[int, set[int]] = {}
        self.next_owner = 0

    @rule(n=st.integers(0, 20), kind=st.sampled_from(["kv", "adapter"]))
    def alloc(self, n, kind):
        free_before = self.a.num_free
        owner = self.next_owner
        self.next_owner += 1
        if n > free_before:
            with pytest.raises(OutOfPages):
                self.a.alloc(owner, n, kind)
            assert self.a.num_free == free_before      # a failed alloc takes nothing
            return
        pages = set(int(p) for p in self.a.alloc(owner, n, kind))
        assert len(pages) == n and NULL_PAGE not in pages
        for other in self.held.values():
            assert not pages & other
        self.held[owner] = pages

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def grow(self, data):
        owner = data.draw(st.sampled_from(sorted(self.held)))
        n = data.draw(st.integers(0, 3))
        if n <= self.a.num_free:
            kind = "kv" if owner in self.a.owners("kv") else "adapter"
            new = set(int(p) for p in self.a.alloc(owner, n, kind))
            assert not new & set().union(*self.held.values())
            self.held[owner] |= new

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        owner = data.draw(st.sampled_from(sorted(self.held)))
        assert self.a.free(owner) == len(self.held.pop(owner))

    @invariant()
    def accounting(self):
        held = sum(len(p) for p in self.held.values())
        assert self.a.num_free + held == self.a.capacity
        assert self.a.pages_used("kv") + self.a.pages_used("adapter") == held

    def teardown(self):
        for owner in list(self.held):
            self.a.free(owner)
        assert self.a.num_free == self.a.capacity


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_waste_accounting():
    mc = TINY["gqa"]
    lay = PoolLayout.create(mc, tiny_engine_config())
    a = PageAllocator(128)
    a.alloc("seq", lay.kv_pages_for(13), "kv")
    a.set_used("seq", kv_used_elems(13, lay))
    ranks = {"q": 4, "v": 4, "down": 4}
    a.alloc("ad", lay.adapter_pages_for(ranks), "adapter")
    a.set_used("ad", adapter_used_elems(ranks, lay))
    w = a.waste(lay, itemsize=4)
    per_page = lay.page_elems * 4 * mc.num_layers
    kv_alloc = lay.kv_pages_for(13) * per_page
    assert w["kv"]["allocated_bytes"] == kv_alloc
    assert w["kv"]["used_bytes"] == 13 * 2 * mc.kv_size * 4 * mc.num_layers
    # The waste of a sequence is below one page; of an adapter, below one page plus,
    # per matrix, its alignment gap (< matrix_align rows), one partial row, and the
    # rank rows a chunked matrix pads to a multiple of 8.
    assert 0 <= w["kv"]["wasted_bytes"] < per_page
    h = mc.hidden_size
    bound_rows = 0
    for i, m in enumerate(MODULES):
        if m in ranks:
            for width in lay.module_shapes[i]:
                c, chunks = matrix_form(width, h)
                pad = chunks * (-ranks[m] % 8) * c if chunks > 1 else 0
                bound_rows += matrix_align(width, h) + 1 + -(-pad // h)
    assert 0 <= w["adapter"]["wasted_bytes"] < per_page + bound_rows * h * 4 * mc.num_layers


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_tokens=st.integers(1, 40), page_size=st.sampled_from([2, 4, 6]),
       model=st.sampled_from(sorted(TINY)))
def test_kv_write_read_roundtrip(seed, n_tokens, page_size, model):
    """K/V written at (page, slot) read back through the page view, other pages untouched."""
    mc = TINY[model]
    lay = PoolLayout.create(mc, EngineConfig(page_size=page_size, num_pages=64))
    rng = np.random.default_rng(seed)
    n_pages = lay.kv_pages_for(n_tokens)
    pages = rng.choice(np.arange(1, 64), n_pages, replace=False).astype(np.int32)
    layer = jnp.asarray(rng.standard_normal((64, page_size, mc.hidden_size)), jnp.float32)
    k = rng.standard_normal((n_tokens, mc.num_kv_heads, mc.head_dim)).astype(np.float32)
    v = rng.standard_normal((n_tokens, mc.num_kv_heads, mc.head_dim)).astype(np.float32)
    pos = np.arange(n_tokens)
    new = write_kv(layer, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pages[pos // lay.tokens_per_page]),
                   jnp.asarray(pos % lay.tokens_per_page, jnp.int32), lay)
    view = np.asarray(kv_page_view(new, lay))[pages]          # [n, 2, tpp, nkv, hd]
    got = view.transpose(1, 0, 2, 3, 4).reshape(2, -1, mc.num_kv_heads, mc.head_dim)[:, :n_tokens]
    np.testing.assert_array_equal(got[0], k)
    np.testing.assert_array_equal(got[1], v)
    others = np.setdiff1d(np.arange(64), pages)
    np.testing.assert_array_equal(np.asarray(new)[others], np.asarray(layer)[others])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 16),
       mods=st.sets(st.sampled_from(MODULES), min_size=1), model=st.sampled_from(sorted(TINY)))
def test_adapter_pages_roundtrip(seed, rank, mods, model):
    """An adapter packed into scattered pages gathers back as exactly its A^T and B."""
    mc = TINY[model]
    ec = tiny_engine_config(num_pages=128)
    lay = PoolLayout.create(mc, ec)
    ad = dummy_adapter(mc, rank, tuple(m for m in MODULES if m in mods), seed=seed)
    rows, rank_v, scale, offset = ad.pack(lay)
    rng = np.random.default_rng(seed)
    pages = rng.choice(np.arange(1, 128), rows.shape[1], replace=False).astype(np.int32)
    pool = init_pool(lay, jnp.float32)
    pool = load_adapter_pages(pool, jnp.asarray(pages), jnp.asarray(rows))
    slot_pages = np.zeros((1, lay.max_adapter_pages), np.int32)
    slot_pages[0, :len(pages)] = pages
    for layer in range(mc.num_layers):
        r_view = adapter_row_view(pool.layers[layer])
        for i, m in enumerate(MODULES):
            for j, width in enumerate(lay.module_shapes[i]):
                got = np.asarray(gather_slot_matrix(r_view, jnp.asarray(slot_pages),
                                                    jnp.asarray(offset[None, i, j]),
                                                    jnp.asarray(rank_v[None, i]), width,
                                                    ec.max_rank, lay.page_size))[0]
                if m in ad.ranks:
                    np.testing.assert_array_equal(got[:rank], ad.weights[layer][m][j])
                assert not got[rank_v[i]:].any()    # nothing past the rank leaks in
