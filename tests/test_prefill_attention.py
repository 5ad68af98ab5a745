"""Packed causal prefill attention: the Mosaic GPU kernel
(`pallas_kernels.prefill_attention_mgpu`) vs `prefill_attention_reference`.

On the CPU the kernel runs through the Mosaic GPU interpreter
(`plgpu.InterpretGPUParams`), which fills every buffer with NaN before the
kernel runs, so an output element the kernel never writes fails the finiteness
check. Tests marked `gpu` compile the kernel for the device at Llama shapes;
run them there with `JAX_PLATFORMS=cuda pytest -m gpu tests/test_prefill_attention.py`.

Every test draws fresh random bf16 inputs (normal, unit variance) and packs the
prompts as `slora_jax.batching.prefill_batch` does: contiguous prompts,
positions 0..len-1, padding tokens at the end with seq_id = num_requests and
position 0. Only real tokens are compared; every output row (padding included)
must be finite. Tolerance: |got - ref| <= 2e-2 + 2e-2 * |ref| elementwise (the
kernel rounds P to bf16 before P @ V, as every bf16 flash kernel does; the
reference is float32 throughout).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import paged_attention, prefill_attention_mgpu as pam

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

TOL = 2e-2


def packed_case(rng, lens, t, *, nq, nkv, hd, dtype=jnp.bfloat16):
    """Prompts of `lens` tokens packed into T tokens, padding at the end."""
    n = sum(lens)
    assert n <= t
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 31))), 3)
    q = jax.random.normal(keys[0], (t, nq, hd), dtype)
    k = jax.random.normal(keys[1], (t, nkv, hd), dtype)
    v = jax.random.normal(keys[2], (t, nkv, hd), dtype)
    seq_ids = np.full(t, len(lens), np.int32)
    positions = np.zeros(t, np.int32)
    off = 0
    for i, m in enumerate(lens):
        seq_ids[off:off + m] = i
        positions[off:off + m] = np.arange(m)
        off += m
    return (q, k, v, jnp.asarray(seq_ids), jnp.asarray(positions)), n


def reference(args, window, heads_per_call=None):
    """The reference, optionally a few KV heads at a time (it holds [H, T, T] scores)."""
    q, k, v, seq_ids, positions = args
    nkv = k.shape[1]
    step = heads_per_call or nkv
    g = q.shape[1] // nkv
    parts = [paged_attention.prefill_attention_reference(
        q[:, h * g:(h + step) * g], k[:, h:h + step], v[:, h:h + step], seq_ids, positions,
        window) for h in range(0, nkv, step)]
    return np.asarray(jnp.concatenate(parts, axis=1))


def check(args, n, window=None, heads_per_call=None, **kw):
    pam._warned.clear()
    got = np.asarray(pam.prefill_attention(*args, window, **kw))
    assert not pam._warned, "the kernel fell back to the reference"
    q = args[0]
    assert got.shape == q.shape and got.dtype == np.float32
    assert np.isfinite(got).all(), "an output element is unwritten (NaN) or not finite"
    ref = reference(args, window, heads_per_call)
    np.testing.assert_allclose(got[:n], ref[:n], atol=TOL, rtol=TOL)


# --- on the CPU, through the interpreter ----------------------------------------------

def test_one_prompt():
    rng = np.random.default_rng()
    check(*packed_case(rng, [100], 100, nq=2, nkv=2, hd=64))      # T padded to 128 in XLA


def test_odd_prompts_packed_with_padding_gqa():
    rng = np.random.default_rng()
    # Segments start mid tile (masked head steps); a padding tail after the last prompt;
    # the default block_kv (128 at hd 64) spans two query tiles.
    check(*packed_case(rng, [1, 7, 64, 131], 240, nq=4, nkv=2, hd=64))


def test_long_prompt_many_kv_tiles_mqa():
    rng = np.random.default_rng()
    # 5 KV tiles of 64 for the last query tile, the middle ones unmasked; T a tile multiple.
    check(*packed_case(rng, [300, 20], 320, nq=2, nkv=1, hd=64), block_kv=64)


def test_sliding_window():
    rng = np.random.default_rng()
    check(*packed_case(rng, [200, 37], 256, nq=2, nkv=1, hd=64), window=50, block_kv=64)


def test_length_one_prompts():
    rng = np.random.default_rng()
    check(*packed_case(rng, [1], 1, nq=1, nkv=1, hd=64))
    check(*packed_case(rng, [1, 1, 3], 8, nq=1, nkv=1, hd=64))


def test_head_dim_128_f16_block_q_128():
    rng = np.random.default_rng()
    check(*packed_case(rng, [70, 129], 256, nq=1, nkv=1, hd=128, dtype=jnp.float16),
          block_q=128, block_kv=128)


def test_stage_refills_are_race_free():
    """More KV steps than stages, under the interpreter's race detector."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    rng = np.random.default_rng()
    args, n = packed_case(rng, [250], 256, nq=1, nkv=1, hd=64)
    check(args, n, block_kv=64, num_stages=2,
          interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert not mgpu_interpret.get_races().races_found


@pytest.mark.parametrize("block_q,block_kv", [(64, 64), (64, 128), (128, 64), (128, 192)])
def test_kv_steps_skip_exactly_the_invisible_tiles(block_q, block_kv):
    """The step ranges the kernel loops over, against brute force on random packings."""
    rng = np.random.default_rng()
    for _ in range(20):
        lens = list(rng.integers(1, 300, rng.integers(1, 6)))
        t = -(-(sum(lens) + int(rng.integers(0, 40))) // np.lcm(block_q, block_kv)) * \
            int(np.lcm(block_q, block_kv))
        positions = np.zeros(t, np.int64)
        off = 0
        for m in lens:
            positions[off:off + m] = np.arange(m)
            off += m
        window = int(rng.integers(1, 200)) if rng.random() < 0.5 else None
        tok = np.arange(t)
        lo = tok - positions
        if window is not None:
            lo = np.maximum(lo, tok - window + 1)
        vis = (tok[None, :] >= lo[:, None]) & (tok[None, :] <= tok[:, None])      # [row, key]
        for t0 in range(0, t, block_q):
            rows = slice(t0, t0 + block_q)
            first, u0, u1, last = map(int, pam._kv_steps(t0, lo[rows].min(), lo[rows].max(),
                                                         block_q, block_kv))
            assert first <= u0 <= u1 <= last
            tile_vis = vis[rows].reshape(block_q, -1, block_kv)       # [row, step, key]
            any_vis = tile_vis.any(axis=(0, 2))
            all_vis = tile_vis.all(axis=(0, 2))
            steps = np.arange(len(any_vis))
            assert not any_vis[(steps < first) | (steps >= last)].any()   # nothing visible skipped
            assert any_vis[first] and any_vis[last - 1]                  # no dead ends loaded
            assert all_vis[u0:u1].all()                                  # unmasked = fully visible
            masked = np.r_[first:u0, u1:last]
            assert not all_vis[masked].any()                             # mask only where needed


@pytest.mark.parametrize("t,nq,nkv,hd,window,kw", [
    (2048, 32, 32, 128, None, {}),                       # Llama-2-7B, defaults
    (2001, 32, 8, 128, 1000, dict(block_q=128)),         # Llama-3-8B, T off the tile
    (8192, 32, 8, 128, None, dict(num_stages=4)),
    (1024, 8, 8, 64, None, {}),
])
def test_lowers_for_the_gpu(t, nq, nkv, hd, window, kw):
    """Mosaic GPU lowering for CUDA (no GPU needed): layouts, TMA shapes, SMEM budget.
    What it does not cover is the device compile (ptxas) and the numbers."""
    from jax import export
    q = jax.ShapeDtypeStruct((t, nq, hd), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((t, nkv, hd), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((t,), jnp.int32)
    pam._warned.clear()
    fn = jax.jit(lambda q, k, v, s, p: pam.prefill_attention(q, k, v, s, p, window, interpret=False,
                                                             **kw))
    module = export.export(fn, platforms=["cuda"])(q, kv, kv, ids, ids).mlir_module()
    assert not pam._warned and "mosaic_gpu" in module


def test_unsupported_falls_back_with_a_log(caplog):
    rng = np.random.default_rng()
    args, n = packed_case(rng, [5, 9], 16, nq=2, nkv=1, hd=64, dtype=jnp.float32)
    pam._warned.clear()
    with caplog.at_level(logging.WARNING, logger="pallas_kernels.prefill_attention_mgpu"):
        for _ in range(2):
            got = np.asarray(pam.prefill_attention(*args))
    assert pam._warned
    np.testing.assert_allclose(got[:n], reference(args, None)[:n], atol=1e-5, rtol=1e-5)
    msgs = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(msgs) == 1                      # said once, not on every call
    pam._warned.clear()                        # K/V stages too large for SMEM
    args, n = packed_case(rng, [5, 9], 16, nq=2, nkv=1, hd=128)
    got = np.asarray(pam.prefill_attention(*args, block_kv=256, num_stages=3))
    assert pam._warned
    np.testing.assert_allclose(got[:n], reference(args, None)[:n], atol=1e-5, rtol=1e-5)


# --- on the GPU, at Llama shapes --------------------------------------------------------

LLAMA_LENS = [1000, 513, 7, 331, 150]          # 2001 tokens, 47 of padding in T = 2048


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nkv,window", [(32, None), (8, None), (8, 700)])
def test_gpu_prefill_llama_packed(nkv, window):
    rng = np.random.default_rng()
    check(*packed_case(rng, LLAMA_LENS, 2048, nq=32, nkv=nkv, hd=128), window,
          heads_per_call=4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_q,block_kv,num_stages", [(64, 128, 2), (64, 64, 4),
                                                        (128, 64, 2)])
def test_gpu_prefill_llama_block_sizes(block_q, block_kv, num_stages):
    rng = np.random.default_rng()
    check(*packed_case(rng, LLAMA_LENS, 2048, nq=32, nkv=8, hd=128), heads_per_call=4,
          block_q=block_q, block_kv=block_kv, num_stages=num_stages)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_llama_single_8k_prompt():
    rng = np.random.default_rng()
    check(*packed_case(rng, [8192], 8192, nq=32, nkv=8, hd=128), heads_per_call=1)
