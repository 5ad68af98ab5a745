"""The whole decode step with the Pallas backends vs the same step on the references.

On the CPU the Mosaic GPU kernels run through the interpreter (a small bf16
model whose widths the kernels serve: head_dim 64, GQA, H = 256); tests marked
`gpu` run the compiled kernels at Llama-7B layer shapes on the device and check
the compiled step still updates the pool in place.

Both steps run on identical copies of one pool, filled by a reference prefill
of mixed prompts over adapters of ranks 1..max_rank on q/k/v/o (plus one on
gate/up/down, whose MLP width F = 320 the kernels read in gcd(F, H) = 64-column
chunks). Each kernel is checked alone, then both; the prefill step (MBGMM and the
packed causal attention kernel) likewise. Tolerance: the LoRA kernels and the reference both
round scale*xa to bf16 before the expand, so they differ only by float32
summation order (exactly 0 in the interpreter); attention rounds the scaled q
and P to bf16 (as bf16 flash kernels do): ~1e-2 of the logits' scale. An adapter
that is dropped or misread moves them by far more (checked below).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora import TuningConfig
from serving.offline import OfflineEngine
from slora_jax.adapters import dummy_adapter
from slora_jax.batching import Sampling, decode_batch, mixed_batch, prefill_batch
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.params import init_dummy_params
from slora_jax.step import decode, mixed, prefill

ON_GPU = jax.default_backend() == "gpu"

SMALL = ModelConfig(vocab_size=211, hidden_size=256, intermediate_size=320, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64, name="small-bf16")
# One layer for the interpreted step checks (each kernel's pool reads and writes are per
# layer; SMALL's second layer runs with -m slow, and at Llama-7B shapes on the GPU).
SMALL_1L = SMALL.with_(num_layers=1, name="small-bf16-1l")
LLAMA7B_2L = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_layers=2, num_heads=32, num_kv_heads=32, head_dim=128,
                         name="llama-7b-2-layers")
BACKENDS = [("reference", "reference"), ("pallas", "reference"), ("reference", "pallas"),
            ("pallas", "pallas"),        # (lora_backend, attention_backend)
            ("pallas-sorted", "reference")]       # the plan the defaults do not pick at
                                                  # small batches: decode rows ordered by
                                                  # adapter (grouped tiles), 32-token
                                                  # tiles at prefill (the narrow expand)
# StepSpec options of the lora backend names above that are not backends ("pallas" runs
# the defaults: unsorted at these batches, 64-token tiles at prefill)
LORA_OPTS = {"pallas-sorted": dict(lora_backend="pallas", lora_tuning=TuningConfig(
    unsorted_max_tokens=0, prefill_block_tokens=32))}
# The default run checks both kernels together in the step; each kernel alone and the
# sorted plan run with -m slow (and each kernel has its own rows in test_kernels.py).
BOTH = [("reference", "reference"), ("pallas", "pallas")]


def _checked(backends):
    return list(backends[1:])


def _spec(eng, lora_b, attn_b):
    opts = LORA_OPTS.get(lora_b, dict(lora_backend=lora_b))
    return eng.spec.with_(attention_backend=attn_b, logits="last", **opts)
ADAPTERS = [(1, ("q", "k", "v", "o")), (16, ("q", "k", "v", "o")), (5, ("q", "v")),
            (8, ("o",)), (4, ("gate", "up", "down"))]


def _engine(mc, batch, context, seed):
    ec = EngineConfig(page_size=16, num_pages=64 + 4 * batch * (context // 16 + 1),
                      max_rank=16, max_batch=batch, max_prefill_tokens=batch * context,
                      max_prefill_requests=batch, max_context=context,
                      max_adapters_per_batch=8, decode_buckets=(batch,))
    # Weights of std 1/sqrt(H) keep activations O(1) at any width, and adapters of std
    # 2/sqrt(H) with scale 2 move q/k/v/o by about half their size: a well-conditioned
    # step (larger weights saturate the softmax, and then rounding flips its winner).
    h = mc.hidden_size
    params = init_dummy_params(mc, jnp.bfloat16, seed=seed, std=h ** -0.5)
    eng = OfflineEngine(params, mc, ec, jnp.bfloat16)
    for i, (r, mods) in enumerate(ADAPTERS):
        eng.add_adapter(dummy_adapter(mc, r, mods, seed=seed + i, std=2 * h ** -0.5,
                                      alpha=2 * r, name=f"a{i}"))
    return eng, params


def _requests(eng, mc, batch, context, seed):
    """`batch` random prompts of 1..context-2 tokens over every adapter and base-only,
    their adapters resident and KV pages allocated: (req_slot, slots, lens, kv, prefill batch,
    prompts)."""
    rng = np.random.default_rng(seed)
    names = [None] + [f"a{i}" for i in range(len(ADAPTERS))]
    req_names = [names[int(i)] for i in rng.integers(0, len(names), batch)]
    req_names[:len(names)] = names                      # every adapter and base-only
    order = sorted({n for n in req_names if n})
    slots = [eng._make_resident(n) for n in order]
    req_slot = [order.index(n) if n else -1 for n in req_names]
    lens = [int(n) for n in rng.integers(1, context - 1, batch)]
    prompts = [list(map(int, rng.integers(0, mc.vocab_size, n))) for n in lens]
    kv = [eng.allocator.alloc(("r", i), eng.layout.kv_pages_for(context), "kv")
          for i in range(batch)]
    pb = prefill_batch(prompts, kv, req_slot, [Sampling()] * batch, slots, eng.ec, eng.layout)
    return req_slot, slots, lens, kv, pb, prompts


def _decode_both(mc, batch, context, seed, backends=BACKENDS):
    """Logits and new pools of one decode step, reference and Pallas, same inputs."""
    eng, params = _engine(mc, batch, context, seed)
    req_slot, slots, lens, kv, pb, _ = _requests(eng, mc, batch, context, seed)
    samp = [Sampling()] * batch
    eng.pool, first = prefill(params, eng.pool, pb, spec=eng.spec)
    db = decode_batch(list(map(int, np.asarray(first.tokens)[:batch])), lens, kv, req_slot,
                      samp, slots, eng.ec, eng.layout)
    out = {}
    for lora_b, attn_b in backends:
        spec = _spec(eng, lora_b, attn_b)
        pool = jax.tree.map(jnp.copy, eng.pool)
        pool, res = decode(params, pool, db, spec=spec)
        out[lora_b, attn_b] = (np.asarray(res.logits[:batch], np.float32), pool)
    # The same step without its adapters: how far the LoRA terms move the logits.
    db_base = decode_batch(list(map(int, np.asarray(first.tokens)[:batch])), lens, kv,
                           [-1] * batch, samp, slots, eng.ec, eng.layout)
    spec = eng.spec.with_(logits="last")
    _, res = decode(params, jax.tree.map(jnp.copy, eng.pool), db_base, spec=spec)
    return out, np.asarray(res.logits[:batch], np.float32), req_slot, eng, params, db


def _check(mc, batch, context, seed, backends=BACKENDS):
    out, base, req_slot, *_ = _decode_both(mc, batch, context, seed, backends)
    scale = np.abs(out["reference", "reference"][0]).max(axis=-1)
    moved = np.abs(base - out["reference", "reference"][0]).max(axis=-1) / scale
    with_lora = np.array(req_slot) >= 0
    errs = {}
    for key in _checked(backends):         # each kernel alone (if asked), then both
        ref, ref_pool = out["reference", "reference"]
        got, got_pool = out[key]
        assert np.all(np.isfinite(got)), key
        errs[key] = err = np.abs(got - ref).max(axis=-1) / scale
        # LoRA really matters here: rows with an adapter move by far more than the error.
        assert np.median(moved[with_lora]) > 5 * err.max(), (key, err.max())
        # Both steps wrote the same K/V into the pool, up to the bf16 rounding of the
        # k/v LoRA terms (and, past layer 0, of the hidden state).
        for a, b in zip(ref_pool.layers, got_pool.layers):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.abs(a - b).max() <= 5e-2 * np.abs(a).max(), key
    print("max error / logits' scale:", {k: float(e.max()) for k, e in errs.items()})
    assert all(e.max() < 2e-2 for e in errs.values()), {k: float(e.max()) for k, e in errs.items()}


# Slow: in the default run, decode rows go through the Pallas LoRA and paged attention kernels
# inside the mixed step below (and through the compiled decode step on the GPU).
@pytest.mark.slow
def test_pallas_decode_step_matches_reference():
    """Interpreted on the CPU: 8 requests over 5 adapters (ranks 1..16) and base-only."""
    _check(SMALL_1L, batch=8, context=40, seed=3, backends=BOTH)


@pytest.mark.slow
def test_pallas_decode_step_each_kernel_matches_reference():
    _check(SMALL, batch=8, context=40, seed=3)


def _assert_matches_reference(out, backends):
    """Each backend's logits within 2e-2 of the references' scale, and the K/V it wrote
    within 5e-2 of the pool's (bf16 rounding of the k/v LoRA terms)."""
    scale = np.abs(out["reference", "reference"][0]).max(axis=-1)
    for key in _checked(backends):
        (ref, ref_pool), (got, got_pool) = out["reference", "reference"], out[key]
        assert np.all(np.isfinite(got)), key
        err = np.abs(got - ref).max(axis=-1) / scale
        assert err.max() < 2e-2, (key, float(err.max()))
        for a, b in zip(ref_pool.layers, got_pool.layers):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.abs(a - b).max() <= 5e-2 * np.abs(a).max(), key


def _check_prefill(mc, batch, context, seed, backends=BACKENDS):
    """The prefill step (packed prompts of odd lengths, every adapter and base-only)
    with each Pallas backend vs the references: last-token logits and the K/V it wrote."""
    eng, params = _engine(mc, batch, context, seed)
    pb = _requests(eng, mc, batch, context, seed)[4]
    out = {}
    for lora_b, attn_b in backends:
        spec = _spec(eng, lora_b, attn_b)
        pool, res = prefill(params, jax.tree.map(jnp.copy, eng.pool), pb, spec=spec)
        out[lora_b, attn_b] = (np.asarray(res.logits[:batch], np.float32), pool)
    _assert_matches_reference(out, backends)


# Slow: in the default run, prompts go through the Pallas kernels inside the mixed step
# below, prompts spanning LoRA token tiles in tests/test_kernels.py.
@pytest.mark.slow
def test_pallas_prefill_step_matches_reference():
    """Interpreted on the CPU: 6 prompts of 1..70 tokens over 5 adapters and base-only."""
    _check_prefill(SMALL_1L, batch=6, context=72, seed=5, backends=BOTH)


@pytest.mark.slow
def test_pallas_prefill_step_each_kernel_matches_reference():
    _check_prefill(SMALL, batch=6, context=72, seed=5)


def _check_mixed(mc, batch, context, seed, backends=BOTH):
    """A mixed step: `batch` decode rows (every adapter and base-only) beside two prompts,
    the first continuing a prompt whose first chunk an earlier step wrote into the pool;
    each Pallas backend vs the references: every sampled row's logits and the pool."""
    n = batch + 2
    eng, params = _engine(mc, n, context, seed)
    req_slot, slots, lens, kv, _, prompts = _requests(eng, mc, n, context, seed)
    lens[batch] = len(prompts[batch]) - len(prompts[batch]) // 2    # its first chunk
    first = prefill_batch([p[:m] for p, m in zip(prompts[:batch + 1], lens)], kv[:batch + 1],
                          req_slot[:batch + 1], [Sampling()] * (batch + 1), slots, eng.ec,
                          eng.layout)
    eng.pool, out0 = prefill(params, eng.pool, first, spec=eng.spec)
    c = lens[batch]
    mb = mixed_batch(
        (list(map(int, np.asarray(out0.tokens)[:batch])), lens[:batch], kv[:batch],
         req_slot[:batch], [Sampling()] * batch),
        ([prompts[batch][c:], prompts[batch + 1]], kv[batch:], req_slot[batch:],
         [Sampling()] * 2, [c, 0]), slots, eng.ec, eng.layout, batch_size=n)
    rows = list(range(batch)) + [n, n + 1]
    out = {}
    for lora_b, attn_b in backends:
        pool, res = mixed(params, jax.tree.map(jnp.copy, eng.pool), mb,
                          spec=_spec(eng, lora_b, attn_b))
        out[lora_b, attn_b] = (np.asarray(res.logits, np.float32)[rows], pool)
    _assert_matches_reference(out, backends)


def test_pallas_mixed_step_matches_reference():
    """Interpreted on the CPU: 6 decode rows over 5 adapters and base-only, then a prompt
    continued from the pool and a new one."""
    _check_mixed(SMALL_1L, batch=6, context=40, seed=9)


@pytest.mark.slow
def test_pallas_mixed_step_two_layers_match_reference():
    _check_mixed(SMALL, batch=6, context=40, seed=9)


@pytest.mark.slow
def test_pallas_mixed_step_sorted_rows_match_reference():
    """The same with the decode rows ordered by adapter inside the step (above
    `unsorted_max_tokens` rows, as at serving batches)."""
    _check_mixed(SMALL, batch=6, context=40, seed=9,
                 backends=[("reference", "reference"), ("pallas-sorted", "pallas")])


def test_weight_projections_output_the_activations_dtype():
    """The step's weight GEMMs return bf16 (as HF's Linear does), the LoRA terms added
    after: at one row a float32 output made XLA tile them 20-28% slower on the H100
    (benchmarks/results/small_gemm_h100_449daeb.md). Only the logits may come out float32."""
    mc = SMALL
    eng, params = _engine(mc, batch=1, context=32, seed=4)
    slot = eng._make_resident("a1")
    kv = [eng.allocator.alloc("r", 2, "kv")]
    b = decode_batch([1], [3], kv, [0], [Sampling()], [slot], eng.ec, eng.layout)
    text = decode.lower(params, eng.pool, b, spec=eng.spec).as_text()
    weights = {f"{w.shape[0]}x{w.shape[1]}xbf16" for lp in params.layers
               for w in (lp.wq, lp.wk, lp.wv, lp.wo, lp.w_gate, lp.w_up, lp.w_down)}
    dots = [l for l in text.splitlines() if "dot_general" in l
            and any(f"tensor<{w}>" in l for w in weights)]
    assert len(dots) >= 7 * mc.num_layers, len(dots)
    f32 = [l for l in dots if re.search(r"->\s*tensor<[\dx]*f32>", l)]
    assert not f32, f32[:2]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_pallas_mixed_step_llama7b_layers():
    _check_mixed(LLAMA7B_2L, batch=64, context=600, seed=11)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_pallas_prefill_step_llama7b_layers():
    _check_prefill(LLAMA7B_2L, batch=8, context=600, seed=7)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [8, 64])
def test_gpu_pallas_decode_step_llama7b_layers(batch):
    _check(LLAMA7B_2L, batch=batch, context=300, seed=batch)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_pallas_step_updates_pool_in_place():
    """With the Pallas kernels in the step, every pool layer is still aliased and never copied."""
    mc = LLAMA7B_2L
    eng, params = _engine(mc, batch=8, context=64, seed=1)
    slots = [eng._make_resident(f"a{i}") for i in range(3)]
    kv = [eng.allocator.alloc(("r", i), 4, "kv") for i in range(8)]
    db = decode_batch(list(range(1, 9)), [30] * 8, kv, [0, 1, 2, -1, 0, 1, 2, 0],
                      [Sampling()] * 8, slots, eng.ec, eng.layout)
    spec = eng.spec.with_(lora_backend="pallas", attention_backend="pallas")
    hlo = decode.lower(params, eng.pool, db, spec=spec).compile().as_text()
    m = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*entry", hlo, re.S)
    assert m, "the pool is not donated"
    n_params = len(jax.tree.leaves(params))
    aliased = {int(p) for p in re.findall(r"\(\s*(\d+)\s*,", m.group(1))}
    assert set(range(n_params, n_params + mc.num_layers)) <= aliased
    shape = "bf16[%d,%d,%d]" % eng.pool.layers[0].shape
    copies = [l for l in hlo.splitlines()
              if re.search(r"=\s*" + re.escape(shape) + r"\{[^}]*\}\s+copy\(", l)]
    assert not copies, copies[:3]
