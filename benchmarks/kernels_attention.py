"""The attention families of the kernel benchmark (`benchmarks/kernels.py`): decode
attention over pool pages and causal prefill attention over packed prompts, each beside
its XLA and library baselines. `kernels.py` documents the rows and runs them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_setup import (MODELS, ON_GPU, PAGE_SIZE, error_text, randn, repeats,
                           uses_kernel)
from pallas_kernels import paged_attention
from slora_jax.pool import PoolLayout, kv_page_view

REF_MAX_T = 2048          # the O(T^2)-memory prefill reference runs up to this many tokens
GATHER_MAX_KV = 4.5e9     # the decode gather reference materialises K/V in f32: bytes cap


def run_attention(cfg, R):
    m = MODELS[cfg["model"]]
    h, nkv, hd = m["h"], m["nkv"], m["hd"]
    b, ctx = cfg["b"], cfg["ctx"]
    nq = h // hd
    kv_bytes = b * ctx * 2 * nkv * hd * 2
    k = repeats(kv_bytes, cap=4)
    tpp = PAGE_SIZE * h // (2 * nkv * hd)
    pk = -(-ctx // tpp)
    num_pages = k * b * pk + 1
    layout = PoolLayout(num_layers=1, num_pages=num_pages, page_size=PAGE_SIZE, row_width=h,
                        num_kv_heads=nkv, head_dim=hd, max_rank=8, module_shapes=())
    key = jax.random.key(ctx + b)
    layer = randn(key, (num_pages, PAGE_SIZE, h))
    perm = np.random.default_rng(b).permutation(num_pages - 1) + 1
    tables = [jnp.asarray(perm[i * b * pk:(i + 1) * b * pk].reshape(b, pk), jnp.int32)
              for i in range(k)]
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = jax.random.normal(key, (b, nq, hd), jnp.bfloat16)
    params = dict(cfg, phase="decode", nkv=nkv, g=nq // nkv, tokens_per_page=tpp, repeats=k)
    common = dict(reps=k, nbytes=kv_bytes + b * nq * hd * (2 + 4))

    def paged(backend):
        def one(layer, pages):
            return paged_attention.decode_attention(q, layer, pages, lengths, layout,
                                                    backend=backend)
        return jax.jit(lambda layer, ts: [one(layer, p) for p in ts])

    R.emit("decode_attention", "pallas", params, paged("pallas"), (layer, tables),
           check_kernel=True, **common)
    if ON_GPU:   # JAX's Pallas-Triton paged attention on the same pages
        from jax.experimental.pallas.ops.gpu import paged_attention as triton_pa
        view = jax.jit(lambda l: tuple(jnp.moveaxis(kv_page_view(l, layout)[:, i], 2, 0)
                                       for i in (0, 1)))
        kp, vp = view(layer)                                  # [nkv, P, tpp, hd] each
        ks = max(d for d in range(1, 17) if pk % d == 0)
        ppcb = max(d for d in (8, 4, 2, 1) if (pk // ks) % d == 0)
        f = jax.jit(lambda kp, vp, ts: [triton_pa.paged_attention(
            q, kp, vp, p, lengths, k_splits=ks, pages_per_compute_block=ppcb) for p in ts])
        R.emit("decode_attention", "triton-paged", dict(params, k_splits=ks, ppcb=ppcb), f,
               (kp, vp, tables), **common)
        del kp, vp
    R.emit("decode_attention", "xla-gather", params, paged("reference"), (layer, tables),
           skip=(f"K/V {kv_bytes / 1e9:.1f} GB: the reference's f32 copies would not fit"
                 if kv_bytes > GATHER_MAX_KV and ON_GPU else None), **common)
    del layer
    # (d): XLA on contiguous caches, no paging.
    kc = [randn(jax.random.key(i), (2, b, ctx, nkv, hd)) for i in range(k)]

    def contig(caches):
        outs = []
        for c in caches:
            qg = q.reshape(b, nkv, nq // nkv, hd)
            s = jnp.einsum("bhgd,blhd->bhgl", qg, c[0], preferred_element_type=jnp.float32)
            p = jax.nn.softmax(s * hd ** -0.5, axis=-1)
            outs.append(jnp.einsum("bhgl,blhd->bhgd", p.astype(c.dtype), c[1],
                                   preferred_element_type=jnp.float32).reshape(b, nq, hd))
        return outs
    R.emit("decode_attention", "xla-contig", params, jax.jit(contig), (kc,), **common)


def run_prefill_attention(cfg, R):
    """Causal prefill over `nseq` packed prompts of `s` tokens each."""
    m = MODELS[cfg["model"]]
    h, nkv, hd = m["h"], m["nkv"], m["hd"]
    nq, nseq, s = h // hd, cfg["nseq"], cfg["s"]
    t = nseq * s
    key = jax.random.key(t)
    q = randn(jax.random.fold_in(key, 0), (t, nq, hd))
    k_ = randn(jax.random.fold_in(key, 1), (t, nkv, hd))
    v = randn(jax.random.fold_in(key, 2), (t, nkv, hd))
    sid = jnp.asarray(np.repeat(np.arange(nseq), s), jnp.int32)
    pos = jnp.asarray(np.tile(np.arange(s), nseq), jnp.int32)
    params = dict(cfg, phase="prefill", t=t, nq=nq, nkv=nkv)
    flops = nseq * 2 * s * s * nq * hd             # 4 s^2 nq hd per prompt, causal half
    in_bytes = q.nbytes + k_.nbytes + v.nbytes

    def nbytes(f, args):
        out = jax.eval_shape(f, *args)
        return in_bytes + sum(o.size * o.dtype.itemsize for o in jax.tree.leaves(out))

    def packed(backend):
        return jax.jit(lambda q, k, v, sid, pos: paged_attention.prefill_attention(
            q, k, v, sid, pos, backend=backend))
    args = (q, k_, v, sid, pos)
    f = packed("pallas")
    try:
        kern, err = uses_kernel(f, args), None
    except Exception as e:
        kern, err = False, error_text(e)
    skip = None if kern or t <= REF_MAX_T else \
        f"falls back to the O(T^2) reference: not run above T={REF_MAX_T}"
    R.emit("prefill_attention", "pallas", params, f, args, nbytes=nbytes(f, args), flops=flops,
           fallback=not kern if err is None else None, skip=skip, error=err)
    f = packed("reference")
    R.emit("prefill_attention", "xla-ref", params, f, args, nbytes=nbytes(f, args), flops=flops,
           skip=None if t <= REF_MAX_T else f"O(T^2) memory: T <= {REF_MAX_T} only")
    if not ON_GPU:
        return
    q4, k4, v4 = (a.reshape(nseq, s, *a.shape[1:]) for a in (q, k_, v))
    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="cudnn"))
    R.emit("prefill_attention", "cudnn", params, f, (q4, k4, v4),
           nbytes=in_bytes + q4.nbytes, flops=flops)
    f, err, blocks = None, None, None
    # JAX's Mosaic flash attention rejects bf16 in 0.11.2 (a bf16 -> f16 copy inside):
    # it runs on f16 inputs, the same bytes and FLOPs.
    q4, k4, v4 = (a.astype(jnp.float16) for a in (q4, k4, v4))
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
        for bq, bkv in ((64, 256), (64, 128), (64, 64)):
            conf = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=True)
            g = jax.jit(lambda q, k, v, conf=conf: am.attention(q, k, v, config=conf))
            try:
                jax.block_until_ready(g(q4, k4, v4))
                f, err, blocks = g, None, (bq, bkv)
                break
            except Exception as e:   # too much SMEM: try smaller blocks; else report
                err = error_text(e)
                if "shared memory" not in str(e):
                    break
    except Exception as e:
        err = error_text(e)
    R.emit("prefill_attention", "mgpu-flash", dict(params, blocks=blocks), f, (q4, k4, v4),
           nbytes=in_bytes + q4.nbytes, flops=flops, error=err)
