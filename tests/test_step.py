"""The step functions against the dense numpy reference, batching invariance, in-place pool.

Tolerances: float32 engine vs float64 reference through a few layers of
random weights: logits agree to 2e-4 relative to their scale.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_engine_config
from dense_reference import dense_greedy, dense_logits
from serving.offline import OfflineEngine, Request
from slora_jax.adapters import dummy_adapter
from slora_jax.batching import Sampling, decode_batch, mixed_batch, prefill_batch
from slora_jax.step import decode, mixed, prefill

ADAPTERS = [  # rank, target set: attention only, MLP only, everything, rank 1
    (2, ("q", "v")), (8, ("gate", "up", "down")), (16, ("q", "k", "v", "o", "gate", "up", "down")),
    (1, ("o", "down")), (5, ("k", "up")),
]


def make_engine(mc, params, **kw):
    eng = OfflineEngine(params, mc, tiny_engine_config(**kw), jnp.float32)
    for i, (r, mods) in enumerate(ADAPTERS):
        eng.add_adapter(dummy_adapter(mc, r, mods, seed=10 + i, std=0.3, alpha=2 * r,
                                      name=f"a{i}"))
    return eng


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-9))


def test_prefill_logits_mixed_batch(tiny):
    mc, params = tiny
    eng = make_engine(mc, params)
    rng = np.random.default_rng(0)
    names = [None, "a0", "a1", None, "a2", "a3", "a4", "a2"]
    prompts = [list(rng.integers(0, mc.vocab_size, int(n))) for n in rng.integers(1, 12, len(names))]
    slots = [eng._make_resident(n) for n in sorted(set(names) - {None})]
    order = sorted(set(names) - {None})
    req_slot = [order.index(n) if n else -1 for n in names]
    kv = [eng.allocator.alloc(("t", i), 4, "kv") for i in range(len(names))]
    b = prefill_batch(prompts, kv, req_slot, [Sampling()] * len(names), slots, eng.ec, eng.layout)
    spec = eng.spec.with_(logits="all")
    eng.pool, out = prefill(params, eng.pool, b, spec=spec)
    logits = np.asarray(out.logits)
    off = 0
    for p, n in zip(prompts, names):
        ref = dense_logits(params, mc, p, eng.adapters[n] if n else None)
        assert rel_err(logits[off:off + len(p)], ref) < 2e-4, n
        off += len(p)
    # The adapters really change the output (the test above would catch a dropped LoRA).
    ref_base = dense_logits(params, mc, prompts[4], None)
    assert rel_err(logits[sum(map(len, prompts[:4])):][:len(prompts[4])], ref_base) > 1e-2


def test_greedy_decode_matches_dense(tiny):
    mc, params = tiny
    eng = make_engine(mc, params)
    rng = np.random.default_rng(1)
    names = [None, "a0", "a1", "a2", "a3", "a4"]
    reqs = [Request(id=str(i), prompt_token_ids=list(map(int, rng.integers(0, mc.vocab_size, 3 + i))),
                    adapter=n, max_tokens=20) for i, n in enumerate(names)]
    results = eng.generate(reqs)
    for req, res in zip(reqs, results):
        assert res.error is None
        ref_tokens, ref_logits = dense_greedy(params, mc, req.prompt_token_ids, 20,
                                              eng.adapters[req.adapter] if req.adapter else None)
        assert res.token_ids == ref_tokens, req.adapter
        ref_lp = [float(l[t] - np.log(np.exp(l - l.max()).sum()) - l.max())
                  for l, t in zip(ref_logits, ref_tokens)]
        np.testing.assert_allclose(res.logprobs, ref_lp, atol=1e-3)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batching_invariance(tiny_gqa_first, temperature):
    """A request's tokens are the same alone and inside a mixed batch of 32 (alone: batch
    bucket 1 and token bucket 32; together: 32 and 128)."""
    mc, params = tiny_gqa_first
    eng = make_engine(mc, params, decode_buckets=(1, 32), prefill_token_buckets=(32, 128))
    rng = np.random.default_rng(2)
    names = [None, "a0", "a1", "a2", "a3", "a4"]
    reqs = [Request(id=f"r{i}", prompt_token_ids=list(map(int, rng.integers(0, mc.vocab_size,
                                                                           int(rng.integers(1, 20))))),
                    adapter=names[i % len(names)], max_tokens=int(rng.integers(4, 12)),
                    sampling=Sampling(temperature=temperature, top_p=0.9, top_k=20, seed=i))
            for i in range(32)]
    together = eng.generate(reqs)
    for i in (0, 7, 13, 31):
        alone = eng.generate([reqs[i]])[0]
        assert alone.token_ids == together[i].token_ids
        np.testing.assert_allclose(alone.logprobs, together[i].logprobs, atol=1e-4)
    assert eng.allocator.pages_used("kv") == 0


def _alias_params(hlo: str) -> set[int]:
    m = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*entry", hlo, re.S)
    assert m, "compiled module has no input_output_alias: the pool is not donated"
    return {int(p) for p in re.findall(r"\(\s*(\d+)\s*,", m.group(1))}


@pytest.mark.parametrize("step", ["decode", "prefill", "mixed"])
def test_pool_is_updated_in_place(tiny_gqa_first, step):
    """Every pool layer is aliased input->output and the compiled step copies none of it.
    (Buffer donation does not depend on the attention form: the MHA model with -m slow.)"""
    mc, params = tiny_gqa_first
    eng = make_engine(mc, params)
    slot = eng._make_resident("a2")
    kv = [eng.allocator.alloc("x", 4, "kv")]
    if step == "decode":
        b = decode_batch([1], [3], kv, [0], [Sampling()], [slot], eng.ec, eng.layout)
        lowered = decode.lower(params, eng.pool, b, spec=eng.spec)
    elif step == "prefill":
        b = prefill_batch([[1, 2, 3]], kv, [0], [Sampling()], [slot], eng.ec, eng.layout)
        lowered = prefill.lower(params, eng.pool, b, spec=eng.spec)
    else:      # decode rows and a prompt continued from the pool (the lax.cond's branch)
        b = mixed_batch(([1], [3], kv, [0], [Sampling()]),
                        ([[1, 2, 3]], kv, [0], [Sampling()], [4]), [slot], eng.ec, eng.layout)
        lowered = mixed.lower(params, eng.pool, b, spec=eng.spec)
    hlo = lowered.compile().as_text()
    n_params = len(jax.tree.leaves(params))
    pool_args = set(range(n_params, n_params + mc.num_layers))
    assert pool_args <= _alias_params(hlo)
    shape = "f32[%d,%d,%d]" % eng.pool.layers[0].shape
    copies = [l for l in hlo.splitlines() if re.search(r"=\s*" + re.escape(shape) + r"\{[^}]*\}\s+copy\(", l)]
    assert not copies, copies[:3]


def test_no_recompile_for_new_mix(tiny_gqa_first):
    """A different mix of requests/adapters in the same buckets reuses the compiled step."""
    mc, params = tiny_gqa_first
    eng = make_engine(mc, params)
    eng.generate([Request("w", [1, 2, 3], "a0", max_tokens=3), Request("v", [9], "a1", max_tokens=2)])
    before = decode._cache_size(), prefill._cache_size()
    eng.generate([Request("x", [4, 5], "a2", max_tokens=3), Request("y", [6], None, max_tokens=3)])
    assert (decode._cache_size(), prefill._cache_size()) == before


def test_lora_modules_restrict_the_step(tiny_gqa_first):
    """An engine that serves LoRA on q/v/o only gives the same tokens for adapters inside
    that set, computes no term for the other modules, and refuses adapters outside it."""
    from serving.offline import RequestError
    from slora_jax.adapters import AdapterError
    from slora_jax.config import EngineConfig
    mc, params = tiny_gqa_first
    full = make_engine(mc, params)
    eng = OfflineEngine(params, mc, tiny_engine_config(lora_modules=["o", "v", "q"]), jnp.float32)
    assert eng.layout.lora_modules == ("q", "v", "o")
    eng.add_adapter(full.adapters["a0"])                     # q, v
    with pytest.raises(RequestError, match=r"a3.*\['down'\]"):
        eng.add_adapter(full.adapters["a3"])                 # o, down
    with pytest.raises(AdapterError, match="down_proj"):
        full.adapters["a3"].pack(eng.layout)
    with pytest.raises(ValueError, match="unknown modules"):
        EngineConfig(lora_modules=("q", "qkv"))

    reqs = [Request("x", [5, 1, 7, 2], "a0", max_tokens=8), Request("y", [3, 3], None, max_tokens=5)]
    got, want = eng.generate(reqs), full.generate(reqs)
    for g, w in zip(got, want):
        assert g.error is None and g.token_ids == w.token_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    # The LoRA gathers for k and the MLP are gone from the compiled decode step.
    slot = eng._make_resident("a0")
    kv = [eng.allocator.alloc("z", 4, "kv")]
    b = decode_batch([1], [3], kv, [0], [Sampling()], [slot], eng.ec, eng.layout)
    n_small = decode.lower(params, eng.pool, b, spec=eng.spec).as_text().count("dot_general")
    n_full = decode.lower(params, full.pool, b, spec=full.spec).as_text().count("dot_general")
    assert n_small < n_full



def test_engine_step_spec_carries_the_lora_tuning_defaults(tiny):
    """An engine's StepSpec carries its backends and the LoRA op's tuning at the measured
    defaults (one table of them, `TuningConfig`'s); a bad tuning value is refused by name."""
    from pallas_kernels.lora import TuningConfig
    from slora_jax.model import StepSpec
    from slora_jax.pool import PoolLayout
    mc, params = tiny
    ec = tiny_engine_config()
    spec = StepSpec.for_engine(mc, PoolLayout.create(mc, ec), ec)
    assert spec == StepSpec(mc, spec.layout, spec.lora_backend, spec.attention_backend)
    assert spec.lora_tuning == TuningConfig()
    assert OfflineEngine(params, mc, ec, jnp.float32).spec == spec
    with pytest.raises(ValueError, match="TuningConfig.decode_block_tokens: 48 is not one of"):
        spec.with_(lora_tuning=TuningConfig(decode_block_tokens=48))
