"""Sweep the paged decode-attention kernel's tiling (block_kv, splits, stages) per shape.

For each (model, batch, context) it times `paged_attention_mgpu.decode_attention`
(kernel + split merge, CUPTI) under every configuration in the sweep and under the
default heuristic, and prints the best against the default, as % of the copy
bandwidth measured in the same run. The defaults in `paged_attention_mgpu` come
from this sweep (`benchmarks/results/tune_decode_attention_*.md`).

    python benchmarks/tune_decode_attention.py                 # the GPU sweep
    python benchmarks/tune_decode_attention.py --quick         # tiny, any device
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.kernels_setup import (copy_bandwidth, git_commit, measure, randn,  # noqa: E402
                                      write_sweep)
from pallas_kernels import paged_attention_mgpu as pam  # noqa: E402
from slora_jax.pool import PoolLayout  # noqa: E402

MODELS = {"llama-7b": dict(h=4096, nkv=32, hd=128), "llama-3-8b": dict(h=4096, nkv=8, hd=128),
          "tiny": dict(h=256, nkv=2, hd=64)}
PAGE_SIZE = 16
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sweep_shape(model, b, ctx, configs, iters, copy_gbps):
    m = MODELS[model]
    h, nkv, hd = m["h"], m["nkv"], m["hd"]
    nq = h // hd
    tpp = PAGE_SIZE * h // (2 * nkv * hd)
    pk = -(-ctx // tpp)
    num_pages = b * pk + 1
    layout = PoolLayout(num_layers=1, num_pages=num_pages, page_size=PAGE_SIZE, row_width=h,
                        num_kv_heads=nkv, head_dim=hd, max_rank=8, module_shapes=())
    key = jax.random.key(ctx + b)
    layer = randn(key, (num_pages, PAGE_SIZE, h))
    perm = np.random.default_rng(b).permutation(num_pages - 1) + 1
    pages = jnp.asarray(perm.reshape(b, pk), jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = jax.random.normal(key, (b, nq, hd), jnp.bfloat16)
    nbytes = b * ctx * 2 * nkv * hd * 2 + b * nq * hd * 6
    ref = None
    rows = []
    for cfg in [None] + configs:
        kw = {} if cfg is None else dict(cfg)
        if cfg is not None and cfg["num_splits"] > -(-ctx // cfg["block_kv"]):
            continue                      # more splits than steps
        f = jax.jit(lambda layer, pages, kw=kw: pam.decode_attention(q, layer, pages, lengths,
                                                                    layout, **kw))
        try:
            out = f(layer, pages)
            if ref is None:
                ref = out
            err = float(jnp.abs(out - ref).max())
            us, _ = measure(f, (layer, pages), iters)
        except Exception as e:   # a config the compiler rejects: say so, go on
            print(f"  {model} B={b} ctx={ctx} {kw}: {type(e).__name__}: {str(e)[:120]}")
            continue
        pct = nbytes / (us * 1e-6) / 1e9 / copy_gbps * 100
        rows.append(dict(model=model, b=b, ctx=ctx, config=kw or "default", us=us,
                         pct_copy=pct, max_diff_vs_default=err))
    del layer
    return rows


def _short(cfg):
    if cfg == "default":
        return "default"
    return " ".join(f"{k.split('_')[-1]}={v}" for k, v in cfg.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama-7b:1:4096,llama-7b:1:16384,llama-7b:16:4096,"
                    "llama-7b:256:256,llama-7b:32:512,llama-3-8b:1:4096,llama-3-8b:8:8192,"
                    "llama-3-8b:256:256,llama-3-8b:64:4096")
    ap.add_argument("--block-kv", default="64,128")
    ap.add_argument("--splits", default="1,2,4,8,16,32")
    ap.add_argument("--stages", default="4", help="stages at block_kv 64 (128 takes 2)")
    ap.add_argument("--heads", default="0,1", help="KV heads per block (0: the default)")
    ap.add_argument("--budget-s", type=float, default=480, help="stop sweeping after this")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.block_kv, args.splits, args.stages, args.heads, args.iters = \
            "tiny:2:128", "64", "1,2", "2", "0,1", 2
    configs = []
    for bkv, sp, st, hp in itertools.product(*(
            [int(v) for v in a.split(",")]
            for a in (args.block_kv, args.splits, args.stages, args.heads))):
        cfg = dict(block_kv=bkv, num_splits=sp, num_stages=st if bkv <= 64 else 2)
        if hp:
            cfg["heads_per_block"] = hp
        if cfg not in configs:
            configs.append(cfg)
    copy_gbps = copy_bandwidth(args.iters)
    rows = []
    t0 = time.perf_counter()
    for shape in args.shapes.split(","):
        if time.perf_counter() - t0 > args.budget_s:
            print(f"budget spent: {shape} and later shapes not swept")
            break
        model, b, ctx = shape.split(":")
        rows += sweep_shape(model, int(b), int(ctx), configs, args.iters, copy_gbps)
    lines = [f"# decode attention tiling sweep ({jax.devices()[0].device_kind}, JAX "
             f"{jax.__version__}, commit {git_commit()[:10]})", "",
             f"`{' '.join(sys.argv)}`; copy {copy_gbps:.0f} GB/s", "",
             "| model | B | ctx | default us | default % copy | best config | best us | "
             "best % copy | best, one head per block | us | % copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, grp in itertools.groupby(rows, key=lambda r: (r["model"], r["b"], r["ctx"])):
        grp = list(grp)
        d = next((r for r in grp if r["config"] == "default"), None)
        best = min(grp, key=lambda r: r["us"])
        if d is None:
            continue
        one = [r for r in grp if r["config"] != "default"
               and r["config"].get("heads_per_block") == 1]
        b1 = min(one, key=lambda r: r["us"]) if one else None
        tail = (f"{_short(b1['config'])} | {b1['us']:.1f} | {b1['pct_copy']:.0f} |" if b1
                else "- | - | - |")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {d['us']:.1f} | {d['pct_copy']:.0f} | "
                     f"{_short(best['config'])} | {best['us']:.1f} | {best['pct_copy']:.0f} | "
                     + tail)
    write_sweep(args.out, "tune_decode_attention", rows, lines, copy_gbps)

if __name__ == "__main__":
    main()
