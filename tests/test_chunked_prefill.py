"""Prompts prefilled in chunks, and steps that carry decode rows and prefill chunks together.

- `continued_prefill_attention` (a chunk attends to its prompt's earlier tokens, read
  from pool pages, and to itself) against float64 numpy, for the jnp reference and for
  the Mosaic GPU kernel (through the interpreter on the CPU; bf16 inputs, tolerance
  2e-2 + 2e-2 * |ref| as in test_prefill_attention.py).
- `step.prefill` / `step.mixed` on the tiny models against the dense float64 reference
  (`tests/dense_reference.py`): a prompt prefilled over three steps, the later two mixed
  with decode rows and with another prompt, adapters of several ranks in one step.
  Tolerance 2e-4 relative to the logits' scale (float32 engine, as test_step.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_engine_config
from dense_reference import dense_logits
from pallas_kernels import paged_attention, prefill_attention_mgpu as pam
from serving.offline import OfflineEngine
from slora_jax.adapters import dummy_adapter
from slora_jax.batching import Sampling, mixed_batch, prefill_batch
from slora_jax.config import EngineConfig, ModelConfig
from slora_jax.pool import PoolLayout, init_pool, kv_location, write_kv
from slora_jax.step import mixed, prefill


# --- attention -------------------------------------------------------------------------

def _np_attention(q, keys, vals):
    """q: [n, nq, d]; keys/vals: per row, [L_i, nkv, d] float64. Softmax attention."""
    nq, d = q.shape[1:]
    out = np.zeros(q.shape, np.float64)
    for i in range(q.shape[0]):
        g = nq // keys[i].shape[1]
        for h in range(nq):
            s = keys[i][:, h // g] @ q[i, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vals[i][:, h // g]
    return out


def check_continued(backend, prefix, window, *, n0=29, n1=17, t=64, nq=2, nkv=1, hd=64,
                    max_context=256, page_size=8, rows=None):
    """Packed [chunk of prompt 0 from `prefix` on (n0 tokens), prompt 1 from 0 (n1), padding
    to t]: prompt 0's rows see its prefix (in the pool) and their own chunk, prompt 1's see
    only themselves. `rows`: how many rows (drawn at random) the float64 check covers."""
    h = nq * hd
    mc = ModelConfig(vocab_size=16, hidden_size=h, intermediate_size=64, num_layers=1,
                     num_heads=nq, num_kv_heads=nkv, head_dim=hd, name="attn")
    lay0 = PoolLayout.create(mc, EngineConfig(page_size=page_size, num_pages=8, max_rank=8,
                                              max_batch=8, max_prefill_tokens=t,
                                              max_prefill_requests=4, max_context=max_context,
                                              max_adapters_per_batch=1))
    n_pages = lay0.kv_pages_for(max_context) + 2
    ec = EngineConfig(page_size=page_size, num_pages=n_pages, max_rank=8, max_batch=8,
                      max_prefill_tokens=t, max_prefill_requests=4, max_context=max_context,
                      max_adapters_per_batch=1)
    lay = PoolLayout.create(mc, ec)
    rng = np.random.default_rng()
    dt = jnp.bfloat16 if backend == "pallas" else jnp.float32
    total = prefix + n0
    pages = np.arange(1, 1 + lay.kv_pages_for(ec.max_context), dtype=np.int32)
    rng.shuffle(pages)                          # a prompt's pages lie anywhere in the pool
    key = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
    k_all = jax.random.normal(key[0], (total, nkv, hd), dt)    # prompt 0, every position
    v_all = jax.random.normal(key[1], (total, nkv, hd), dt)
    k1 = jax.random.normal(key[2], (n1, nkv, hd), dt)
    v1 = jax.random.normal(key[3], (n1, nkv, hd), dt)
    q = jax.random.normal(key[4], (t, nq, hd), dt)
    layer = init_pool(lay, dt).layers[0]
    if prefix:                          # the earlier chunks' K/V, where their steps wrote them
        page, slot = kv_location(jnp.asarray(pages)[None].repeat(prefix, 0),
                                 jnp.arange(prefix), lay)
        layer = write_kv(layer, k_all[:prefix], v_all[:prefix], page, slot, lay)
    pad = t - n0 - n1
    k = jnp.concatenate([k_all[prefix:], k1, jnp.zeros((pad, nkv, hd), dt)])
    v = jnp.concatenate([v_all[prefix:], v1, jnp.zeros((pad, nkv, hd), dt)])
    seq_ids = jnp.asarray([0] * n0 + [1] * n1 + [2] * pad, jnp.int32)
    positions = jnp.asarray(list(range(prefix, total)) + list(range(n1)) + [0] * pad, jnp.int32)
    pam._warned.clear()
    got = jax.jit(lambda *a: paged_attention.continued_prefill_attention(
        *a, lay, window, backend=backend))(q, k, v, seq_ids, positions, layer,
                                            jnp.asarray(pages), jnp.int32(prefix))
    assert not pam._warned, "the kernel fell back to the reference"
    got = np.asarray(got)
    assert got.shape == q.shape and np.isfinite(got).all()
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    idx = np.arange(n0 + n1) if rows is None else np.sort(rng.choice(n0 + n1, rows, False))
    keys, vals = [], []
    for i in idx:
        if i < n0:                      # prompt 0's row at position prefix + i
            end, ks, vs = prefix + i + 1, k_all, v_all
        else:
            end, ks, vs = i - n0 + 1, k1, v1
        lo = 0 if window is None else max(0, end - window)
        keys.append(f64(ks[lo:end]))
        vals.append(f64(vs[lo:end]))
    ref = _np_attention(f64(q[idx]), keys, vals)
    tol = 2e-2 if backend == "pallas" else 1e-5
    np.testing.assert_allclose(got[idx], ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,prefix,window", [
    ("reference", 45, None), ("reference", 0, None), ("reference", 45, 20),
    ("pallas", 70, None), pytest.param("pallas", 70, 40, marks=pytest.mark.slow)])
def test_continued_prefill_attention_matches_float64(backend, prefix, window):
    check_continued(backend, prefix, window)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefix,n0,window", [(4976, 1024, None), (3000, 700, 1000)])
def test_gpu_continued_prefill_llama3_8b(prefix, n0, window):
    """Llama-3-8B attention (32 query heads, 8 KV heads, hd 128, context 8192): the last
    chunk of a 6000-token prompt prefilled 1024 tokens at a time, packed with another."""
    check_continued("pallas", prefix, window, n0=n0, n1=200, t=1280, nq=32, nkv=8, hd=128,
                    max_context=8192, page_size=16, rows=96)


# --- steps -------------------------------------------------------------------------------

ADAPTERS = [(2, ("q", "v")), (8, ("gate", "up", "down")),
            (16, ("q", "k", "v", "o", "gate", "up", "down"))]


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-9))


def test_chunks_and_decode_rows_in_one_step_match_dense(tiny_gqa_first):
    """Prompt A (adapter a2) prefilled in three chunks: alone with B and D's prompts, then
    with B and D decoding and prompt C (a1) packed after it, then with B, C, D decoding.
    Every sampled row's logits equal the dense float64 model's at that position."""
    mc, params = tiny_gqa_first
    eng = OfflineEngine(params, mc, tiny_engine_config(max_prefill_requests=4), jnp.float32)
    for i, (r, mods) in enumerate(ADAPTERS):
        eng.add_adapter(dummy_adapter(mc, r, mods, seed=20 + i, std=0.3, alpha=2 * r,
                                      name=f"a{i}"))
    slots = [eng._make_resident(n) for n in ("a0", "a1", "a2")]
    slot_of = {"a0": 0, "a1": 1, "a2": 2, None: -1}
    rng = np.random.default_rng()
    prompt = {n: list(map(int, rng.integers(0, mc.vocab_size, m)))
              for n, m in (("A", 41), ("B", 9), ("C", 11), ("D", 5))}
    adapter = {"A": "a2", "B": "a0", "C": "a1", "D": None}
    kv = {n: eng.allocator.alloc(("t", n), eng.layout.kv_pages_for(eng.ec.max_context), "kv")
          for n in prompt}
    spec = eng.spec.with_(logits="last")
    g = [Sampling()]
    ref = {n: dense_logits(params, mc, prompt[n], eng.adapters[adapter[n]] if adapter[n] else None)
           for n in prompt}

    def greedy(logits):
        return int(np.argmax(logits))

    # Step 1: A[:12] (a chunk), B and D whole.
    b = prefill_batch([prompt["A"][:12], prompt["B"], prompt["D"]],
                      [kv["A"], kv["B"], kv["D"]], [slot_of[adapter[n]] for n in "ABD"], g * 3,
                      slots, eng.ec, eng.layout, starts=[0, 0, 0])
    eng.pool, out = prefill(params, eng.pool, b, spec=spec)
    lg = np.asarray(out.logits)
    for i, n in ((1, "B"), (2, "D")):
        assert rel_err(lg[i], ref[n][-1]) < 2e-4, n
    assert rel_err(lg[0], ref["A"][11]) < 2e-4
    nxt = {n: greedy(lg[i]) for i, n in ((1, "B"), (2, "D"))}
    seqs = {n: prompt[n] + [nxt[n]] for n in "BD"}

    # Step 2: B, D decode; A[12:30] continues (prefix 12), C whole after it.
    dec = ["B", "D"]
    mb = mixed_batch(
        ([nxt[n] for n in dec], [len(seqs[n]) - 1 for n in dec], [kv[n] for n in dec],
         [slot_of[adapter[n]] for n in dec], g * 2),
        ([prompt["A"][12:30], prompt["C"]], [kv["A"], kv["C"]],
         [slot_of[adapter[n]] for n in "AC"], g * 2, [12, 0]),
        slots, eng.ec, eng.layout, batch_size=8)
    eng.pool, out = mixed(params, eng.pool, mb, spec=spec)
    lg = np.asarray(out.logits)
    b_rows = mb.decode.tokens.shape[0]
    for i, n in enumerate(dec):
        r = dense_logits(params, mc, seqs[n], eng.adapters[adapter[n]] if adapter[n] else None)
        assert rel_err(lg[i], r[-1]) < 2e-4, n
        nxt[n] = greedy(lg[i])
        seqs[n] = seqs[n] + [nxt[n]]
    assert rel_err(lg[b_rows], ref["A"][29]) < 2e-4, "A's second chunk"
    assert rel_err(lg[b_rows + 1], ref["C"][-1]) < 2e-4, "C"
    nxt["C"] = greedy(lg[b_rows + 1])
    seqs["C"] = prompt["C"] + [nxt["C"]]

    # Step 3: B, C, D decode; A's last chunk (prefix 30) alone in the prefill half.
    dec = ["B", "C", "D"]
    mb = mixed_batch(
        ([nxt[n] for n in dec], [len(seqs[n]) - 1 for n in dec], [kv[n] for n in dec],
         [slot_of[adapter[n]] for n in dec], g * 3),
        ([prompt["A"][30:]], [kv["A"]], [slot_of["a2"]], g, [30]),
        slots, eng.ec, eng.layout, batch_size=8)
    eng.pool, out = mixed(params, eng.pool, mb, spec=spec)
    lg = np.asarray(out.logits)
    for i, n in enumerate(dec):
        r = dense_logits(params, mc, seqs[n], eng.adapters[adapter[n]] if adapter[n] else None)
        assert rel_err(lg[i], r[-1]) < 2e-4, n
    assert rel_err(lg[b_rows], ref["A"][-1]) < 2e-4, "A's last chunk"
    # The adapters matter here (a dropped LoRA term would fail the checks above).
    base = dense_logits(params, mc, prompt["A"], None)
    assert rel_err(lg[b_rows], base[-1]) > 1e-2


def test_only_the_first_prompt_may_continue(tiny):
    mc, params = tiny
    eng = OfflineEngine(params, mc, tiny_engine_config(), jnp.float32)
    with pytest.raises(ValueError, match="only the first packed prompt"):
        prefill_batch([[1, 2], [3]], [np.zeros(0, np.int32)] * 2, [-1, -1], [Sampling()] * 2,
                      [], eng.ec, eng.layout, starts=[0, 4])
