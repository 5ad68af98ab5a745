"""Isolation between the requests of one step: no request's adapter, prompt or K/V
can change another request's outputs.

Each test runs one computation twice on fresh random inputs: clean, then with one
sequence X poisoned (its q/k/v, its adapter's rows in the pool: NaN, +-inf and huge
finite values) and every pool row no request owns filled with NaN: free pages,
the null page 0, the tail of each request's last KV page and the KV pages it
holds past its length, the unused rows of adapter pages (alignment padding, rank
rows past a rank, the end of an adapter's last page). Every output of every
other sequence must be bit-identical to the clean run (`assert_array_equal`):
a key or rank row hidden from a token must add exactly nothing to it, never
0 * v (0 * NaN is NaN).

Covered: packed prefill attention and paged decode attention (the references and
the Mosaic GPU kernels, interpreted on the CPU), the LoRA op (reference and
kernels, decode tiles unsorted and grouped by slot, prefill's wide tiles) and whole
`prefill` + `decode` steps of a small bf16 model with requests of a poisoned
adapter (NaN/inf, or finite weights times 1e25 that overflow in the step), of a
clean adapter and of none in one batch. The `gpu` test runs the whole steps on
the compiled kernels (tokens exact, logits to 1e-5 of their scale: XLA's GPU
reductions need not repeat their order):
`JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_isolation.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import (lora, lora_mgpu, lora_plan, paged_attention, paged_attention_mgpu,
                            prefill_attention_mgpu)
from slora_jax.adapters import dummy_adapter
from slora_jax.batching import Sampling, SlotInfo, decode_batch, lora_batch, prefill_batch
from slora_jax.config import MODULES, EngineConfig, ModelConfig
from slora_jax.model import StepSpec
from slora_jax.params import init_dummy_params
from slora_jax.pool import Pool, PoolLayout, pack_adapter_rows
from slora_jax.step import decode, prefill

# The interpreter multiplies the poisoned sequence's own NaN/inf: expected, not a fault.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = None if ON_GPU else plgpu.InterpretGPUParams()
# Interpreted kernels compile to large CPU programs: skip XLA's backend optimizations
# (a third of the compile time). Clean and poisoned runs share each compiled function.
COMPILE = None if ON_GPU else {"xla_backend_optimization_level": 0}


def poison(shape, dtype=jnp.bfloat16) -> np.ndarray:
    """NaN, +inf, -inf and a huge finite value, in turn (float32, cast by the caller)."""
    vals = np.array([np.nan, np.inf, -np.inf, 1e25], np.float32)
    return vals[np.arange(int(np.prod(shape))) % 4].reshape(shape)


def _bf16(rng, shape):
    return np.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)


def assert_rows_equal(got, clean, keep, what, exact=True):
    """Rows `keep` of `got` are bit-identical to the clean run's (`exact=False`: to 1e-5
    of their scale, for XLA on the GPU, whose reductions may change order between runs;
    a leak makes NaN or moves a row by far more)."""
    got, clean = np.asarray(got, np.float32), np.asarray(clean, np.float32)
    assert np.isfinite(clean[keep]).all(), f"{what}: the clean run is not finite"
    if exact:
        np.testing.assert_array_equal(got[keep], clean[keep], err_msg=str(what))
    else:
        tol = 1e-5 * max(1.0, float(np.abs(clean[keep]).max()))
        np.testing.assert_allclose(got[keep], clean[keep], rtol=0, atol=tol, err_msg=str(what))


# --- prefill attention -----------------------------------------------------------------

# Four prompts packed into 192 tokens: the poisoned one (index 2, tokens 65..94) shares
# a 64-row query tile with the prompts on both sides, and KV tiles with all of them.
LENS, T_PREFILL, POISONED = [5, 60, 30, 40], 192, 2


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_prefill_attention_hides_other_prompts(impl):
    """The kernel with 64-key tiles: masked head tiles, unmasked middle ones and masked
    diagonal ones (the step test runs its default, 128-key tiles)."""
    rng = np.random.default_rng()
    nq, nkv, hd, t = 4, 2, 64, T_PREFILL
    q, k, v = (_bf16(rng, (t, n, hd)) for n in (nq, nkv, nkv))
    seq_ids = np.full(t, len(LENS), np.int32)
    positions = np.zeros(t, np.int32)
    off = 0
    for i, n in enumerate(LENS):
        seq_ids[off:off + n], positions[off:off + n] = i, np.arange(n)
        off += n
    bad = seq_ids == POISONED
    pq, pk, pv = q.copy(), k.copy(), v.copy()
    for a in (pq, pk, pv):
        a[bad] = poison(a[bad].shape)

    @functools.partial(jax.jit, compiler_options=COMPILE)
    def run(q, k, v):
        args = (q, k, v, jnp.asarray(seq_ids), jnp.asarray(positions))
        if impl == "reference":
            return paged_attention.prefill_attention_reference(*args)
        return prefill_attention_mgpu.prefill_attention(*args, block_kv=64,
                                                        interpret=INTERPRET)

    keep = (seq_ids != POISONED) & (seq_ids < len(LENS))
    assert_rows_equal(run(*(jnp.asarray(a, jnp.bfloat16) for a in (pq, pk, pv))),
                      run(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))), keep, impl)


# --- decode attention ------------------------------------------------------------------

def _decode_case(rng, *, nkv, g, lengths, pages_per_req):
    """A pool layer of 8-token pages (hd 64) and requests on scattered pages, the second
    one poisoned. Returns the layout and (q, layer, kv_pages, lengths) clean and
    poisoned; poisoned, every element outside the requests' live K/V is NaN."""
    hd, page_size, b = 64, 8, len(lengths)
    layout = PoolLayout(num_layers=1, num_pages=b * pages_per_req + 5, page_size=page_size,
                        row_width=128 * nkv, num_kv_heads=nkv, head_dim=hd, max_rank=8,
                        module_shapes=())
    tpp = layout.tokens_per_page
    assert 2 * tpp * layout.kv_size == layout.page_elems      # a page is all K/V
    kv_pages = rng.permutation(np.arange(1, layout.num_pages))[:b * pages_per_req]
    kv_pages = kv_pages.reshape(b, pages_per_req).astype(np.int32)
    kv_pages[0, -2:] = 0                           # unallocated entries: the null page
    view = (layout.num_pages, 2, tpp, nkv, hd)    # `kv_page_view`
    layer = np.asarray(_bf16(rng, view), np.float32)
    bad_layer = np.full(view, np.nan, np.float32)
    for r, n in enumerate(lengths):
        for p in range(n):
            page, slot = kv_pages[r, p // tpp], p % tpp
            kv = layer[page, :, slot]
            bad_layer[page, :, slot] = poison(kv.shape) if r == 1 else kv
    q = np.asarray(_bf16(rng, (b, nkv * g, hd)), np.float32)
    bad_q = q.copy()
    bad_q[1] = poison(q[1].shape)
    shape = (layout.num_pages, page_size, layout.row_width)
    lengths = jnp.asarray(lengths, jnp.int32)
    return layout, *((jnp.asarray(qq, jnp.bfloat16), jnp.asarray(ll.reshape(shape), jnp.bfloat16),
                      jnp.asarray(kv_pages), lengths)
                     for qq, ll in ((q, layer), (bad_q, bad_layer)))


@pytest.mark.parametrize("impl,window", [("reference", None), ("reference", 40),
                                         ("kernel", 40)])
def test_decode_attention_hides_stale_and_other_pages(impl, window):
    """The kernel with two KV heads per block, three context splits and a window, so
    both a request's last step and its first are masked (the step test runs the
    default tiling)."""
    rng = np.random.default_rng()
    layout, clean, bad = _decode_case(rng, nkv=2, g=2, lengths=[13, 69, 150],
                                      pages_per_req=20)

    @functools.partial(jax.jit, compiler_options=COMPILE)
    def run(*args):
        if impl == "reference":
            return paged_attention.decode_attention_reference(*args, layout, window)
        return paged_attention_mgpu.decode_attention(
            *args, layout, window, block_kv=64, num_splits=3, heads_per_block=2,
            interpret=INTERPRET)

    paged_attention_mgpu._warned.clear()
    assert_rows_equal(run(*bad), run(*clean), np.array([True, False, True]), (impl, window))
    assert not paged_attention_mgpu._warned, "the kernel fell back to the reference"


# --- the LoRA op -----------------------------------------------------------------------

# Widths the kernels serve: q 128, k/v 64 (flat), gate/up 192 = 3 chunks of 64.
LORA_MC = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=192, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=64, name="isolation-lora")
# Slot 0 clean rank 5 (a partial last group), slot 1 the poisoned adapter, slot 2 clean
# rank 16 on some modules, slot 3 empty (as the batch's unused slots are).
SLOT_ADAPTERS = [(5, MODULES), (8, MODULES), (16, ("q", "v", "gate", "up", "down"))]
X_SLOT = 1


def _pool_with_adapters(mc, ec, adapters, *, x_slot, seed, x_values="nan"):
    """A pool holding `adapters` on scattered pages: (layout, slots, clean pool layers,
    poisoned pool layers, pages no adapter uses). Clean, the rows no adapter uses hold
    random finite values; poisoned, NaN, and the adapter of slot `x_slot` is `poison`
    wherever it has a weight (x_values "nan"), or its weights times 1e25 ("huge")."""
    rng = np.random.default_rng(seed)
    layout = PoolLayout.create(mc, ec)
    shape = (layout.num_pages, layout.page_size, layout.row_width)
    clean = [np.asarray(rng.standard_normal(shape, np.float32) * 0.1, np.float32)
             for _ in range(mc.num_layers)]
    bad = [np.full(shape, np.nan, np.float32) for _ in range(mc.num_layers)]
    free = list(rng.permutation(np.arange(1, layout.num_pages)))
    slots = []
    for i, ad in enumerate(adapters):
        rows, rank, scale, offset = ad.pack(layout)
        ones = [{m: (np.ones_like(a), np.ones_like(b)) for m, (a, b) in lw.items()}
                for lw in ad.weights]
        used = pack_adapter_rows(ones, ad.ranks, layout) != 0       # [L, n, ps, H]
        pages = np.asarray(free[:rows.shape[1]], np.int32)
        del free[:rows.shape[1]]
        for l in range(mc.num_layers):
            clean[l][pages] = rows[l]
            x = {"nan": poison(rows[l].shape), "huge": rows[l] * 1e25}[x_values]
            bad[l][pages] = np.where(used[l], x if i == x_slot else rows[l], np.nan)
        slots.append(SlotInfo(pages, rank, scale, offset))
    return layout, slots, clean, bad, np.asarray(free, np.int32)


LORA_EC = EngineConfig(page_size=16, num_pages=64, max_rank=16, max_adapters_per_batch=4)


def _lora_case(seed):
    mc, ec = LORA_MC, LORA_EC
    ads = [dummy_adapter(mc, r, mods, seed=seed + i, std=0.25, name=f"s{i}")
           for i, (r, mods) in enumerate(SLOT_ADAPTERS)]
    layout, slots, clean, bad, _ = _pool_with_adapters(mc, ec, ads, x_slot=X_SLOT, seed=seed)
    lb = lora_batch(slots, 4, layout)
    return mc, layout, lb, clean[0].reshape(-1, mc.hidden_size), bad[0].reshape(
        -1, mc.hidden_size)


DECODE_SLOTS = [1, 0, -1, 2, 1, 1, 0, -1, 2, 0, 1, -1, 2, 2, 0, 1]       # tiles of 8
# Tiles of 64: the first all rank 5 (rows past the rank in its last group), the second
# mixed.
PREFILL_SLOTS = [0] * 72 + [1] * 30 + [-1] * 10 + [2] * 16
LORA_GROUPS = [("q", "k", "v"), ("gate", "up"), ("down",)]


@functools.partial(jax.jit, static_argnames=("impl", "k_in", "widths", "bt", "grouped"),
                   compiler_options=COMPILE)
def _lora_terms(x, rows, token_slot, slot_pages, a_off, b_off, ranks, scales, *, impl, k_in,
                widths, bt, grouped):
    """The LoRA terms of one module group, as the step computes them (`model.lora_plans`)."""
    x, rows = x.astype(jnp.bfloat16), rows.astype(jnp.bfloat16)
    tokens = None
    if impl == "pallas":
        tokens = lora_plan.plan_tokens(token_slot, slot_pages.shape[0], bt, grouped=grouped)
    plan = lora.make_plan(token_slot, slot_pages, a_off, b_off, ranks, scales, widths=widths,
                          k_in=k_in, max_rank=LORA_EC.max_rank, page_size=LORA_EC.page_size,
                          rows_shape=rows.shape, tokens=tokens)
    return lora.lora_apply(x, rows, plan)


@pytest.mark.parametrize("impl,tokens,bt,grouped,groups", [
    ("reference", "decode", None, False, LORA_GROUPS),
    ("reference", "prefill", None, False, LORA_GROUPS),
    # Tiles of mixed slots (q/k/v: flat B 128 and 64 wide), tokens ordered by slot (gate/up:
    # B in 64-column chunks), prefill's wide tiles (down: A in 64-column chunks).
    ("pallas", "decode", 8, False, LORA_GROUPS[:1]),
    ("pallas", "decode", 8, True, LORA_GROUPS[1:2]),
    ("pallas", "prefill", 64, False, LORA_GROUPS[2:])])
def test_lora_terms_ignore_other_adapters_rows(impl, tokens, bt, grouped, groups):
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 20))
    mc, layout, lb, rows, bad_rows = _lora_case(seed)
    slots = np.asarray(DECODE_SLOTS if tokens == "decode" else PREFILL_SLOTS)
    if grouped:          # ordered by slot, no adapter last, as the decode step orders them
        slots = slots[np.argsort(np.where(slots >= 0, slots, 4), kind="stable")]
    token_slot = jnp.asarray(slots, jnp.int32)
    lora_mgpu._warned.clear()
    keep = np.asarray(token_slot) != X_SLOT
    for mods in groups:
        idx = [MODULES.index(m) for m in mods]
        k_in = layout.module_shapes[idx[0]][0]
        x = np.asarray(_bf16(rng, (token_slot.shape[0], k_in)), np.float32)
        bad_x = x.copy()
        bad_x[~keep] = poison(x[~keep].shape)
        tables = (token_slot, jnp.asarray(lb.slot_pages), jnp.asarray(lb.slot_offset[:, idx, 0]),
                  jnp.asarray(lb.slot_offset[:, idx, 1]), jnp.asarray(lb.slot_rank[:, idx]),
                  jnp.asarray(lb.slot_scale[:, idx]))
        opts = dict(impl=impl, k_in=k_in, widths=tuple(layout.module_shapes[i][1] for i in idx),
                    bt=bt, grouped=grouped)
        clean = _lora_terms(jnp.asarray(x), jnp.asarray(rows), *tables, **opts)
        got = _lora_terms(jnp.asarray(bad_x), jnp.asarray(bad_rows), *tables, **opts)
        for m, a, b in zip(mods, got, clean):
            assert_rows_equal(a, b, keep, (impl, tokens, grouped, m, seed))
    assert not lora_mgpu._warned, "the kernels fell back to the reference"


# --- whole steps -----------------------------------------------------------------------

# A one-layer bf16 model whose widths the kernels serve (head_dim 64, H = q = k = v = 128),
# LoRA on q/k/v only: few kernels to interpret (the LoRA op test covers the others).
STEP_MC = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=64, name="isolation-step")
STEP_MODULES = ("q", "k", "v")
STEP_ADAPTERS = [(5, STEP_MODULES), (8, STEP_MODULES)]     # slot 0 clean, slot 1 poisoned
# Requests: clean adapter, poisoned adapter, base model, clean adapter; the poisoned
# prompt shares LoRA and attention tiles with the prompts on both sides.
STEP_SLOTS, STEP_LENS = [0, 1, -1, 0], [40, 37, 30, 10]


def _step_runs(mc, lora_b, attn_b, seed):
    """prefill then decode on the clean pool and on each poisoned one (the poisoned
    adapter's weights NaN/inf, or all times 1e25): {variant: (prefill out, the K/V the
    prefill wrote for each request, decode out)}, outputs as [tokens, logprobs, logits]."""
    ec = EngineConfig(page_size=16, num_pages=64, max_rank=16, max_batch=4,
                      max_prefill_tokens=128, max_prefill_requests=4, max_context=64,
                      max_adapters_per_batch=2, lora_modules=STEP_MODULES)
    params = init_dummy_params(mc, jnp.bfloat16, seed=seed, std=mc.hidden_size ** -0.5)
    ads = [dummy_adapter(mc, r, mods, seed=seed + i, std=2 * mc.hidden_size ** -0.5,
                         alpha=2 * r, name=f"a{i}") for i, (r, mods) in enumerate(STEP_ADAPTERS)]
    pools = {}
    for variant in ("nan", "huge"):
        layout, slots, clean, pools[variant], free = _pool_with_adapters(
            mc, ec, ads, x_slot=1, seed=seed, x_values=variant)
    pools["clean"] = clean
    n_kv = layout.kv_pages_for(ec.max_context)
    kv = [free[i * n_kv:(i + 1) * n_kv] for i in range(len(STEP_LENS))]
    rng = np.random.default_rng(seed)
    prompts = [list(map(int, rng.integers(0, mc.vocab_size, n))) for n in STEP_LENS]
    samp = [Sampling()] * len(prompts)
    pb = prefill_batch(prompts, kv, STEP_SLOTS, samp, slots, ec, layout)
    spec = StepSpec(mc, layout, lora_backend=lora_b, attention_backend=attn_b, logits="last")
    n = len(prompts)
    as_pool = lambda layers: Pool(layers=tuple(jnp.asarray(l, jnp.bfloat16) for l in layers))
    run_prefill = prefill.lower(params, as_pool(clean), pb, spec=spec).compile(COMPILE)
    outs = lambda o: [np.asarray(a)[:n] for a in (o.tokens, o.logprobs, o.logits)]
    db = run_decode = None
    res = {}
    for variant in ("clean", "nan", "huge"):
        pool, first = run_prefill(params, as_pool(pools[variant]), pb)
        view = np.asarray(pool.layers[0], np.float32).reshape(
            layout.num_pages, 2, layout.tokens_per_page, -1)
        tpp = layout.tokens_per_page
        written = [np.stack([view[kv[i][p // tpp], :, p % tpp] for p in range(m)])
                   for i, m in enumerate(STEP_LENS)]
        if db is None:           # the clean run's next tokens, for every run's decode
            db = decode_batch(list(map(int, np.asarray(first.tokens)[:n])), STEP_LENS, kv,
                              STEP_SLOTS, samp, slots, ec, layout)
            run_decode = decode.lower(params, pool, db, spec=spec).compile(COMPILE)
        _, out = run_decode(params, pool, db)
        res[variant] = (outs(first), written, outs(out))
    return res


KERNEL_MODULES = (lora_mgpu, paged_attention_mgpu, prefill_attention_mgpu)


def _check_step(mc, lora_b, attn_b, exact=True):
    for m in KERNEL_MODULES:
        m._warned.clear()
    seed = int(np.random.default_rng().integers(1 << 20))
    res = _step_runs(mc, lora_b, attn_b, seed)
    if "pallas" in (lora_b, attn_b):
        assert not any(m._warned for m in KERNEL_MODULES), "a kernel fell back to the reference"
    keep = np.array(STEP_SLOTS) != 1
    (pre_c, kv_c, dec_c) = res["clean"]
    for variant in ("nan", "huge"):
        pre, kv, dec = res[variant]
        np.testing.assert_array_equal(pre[0][keep], pre_c[0][keep], err_msg=f"prefill {seed}")
        np.testing.assert_array_equal(dec[0][keep], dec_c[0][keep], err_msg=f"decode {seed}")
        for name, got, clean in zip(("logprobs", "logits"), pre[1:], pre_c[1:]):
            assert_rows_equal(got, clean, keep, ("prefill", name, variant, seed), exact)
        for i in np.flatnonzero(keep):
            assert_rows_equal(kv[i], kv_c[i], slice(None), ("K/V written", i, variant, seed),
                              exact)
        for name, got, clean in zip(("logprobs", "logits"), dec[1:], dec_c[1:]):
            assert_rows_equal(got, clean, keep, ("decode", name, variant, seed), exact)


# Pallas interpreted with -m slow: each kernel's isolation is checked above, and the
# compiled steps in test_gpu_step_outputs_ignore_a_poisoned_adapter.
@pytest.mark.parametrize("backend", ["reference", pytest.param("pallas", marks=pytest.mark.slow)])
def test_step_outputs_ignore_a_poisoned_adapter(backend):
    """prefill, then decode, of requests of a poisoned adapter, a clean one and none;
    Pallas: the kernels interpreted on the CPU."""
    _check_step(STEP_MC, backend, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_step_outputs_ignore_a_poisoned_adapter():
    """The same steps on the compiled Mosaic GPU kernels."""
    _check_step(STEP_MC, "pallas", "pallas", exact=False)
