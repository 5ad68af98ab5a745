"""Sweep the decode LoRA kernels' work split (K/N splits, chunk lanes, stages, blocks).

For each (model, module group, batch, adapters, ranks) it builds one step's
plan (`lora.token_plan`, `lora.make_plan`), then times with CUPTI the shrink kernel and
the expand kernel alone under every `TuningConfig` of the sweep and under the defaults,
and the whole `lora_apply` (both kernels and the XLA between them) under the defaults.
Each row gives the bytes the kernel must move (every item's rank rows once, the
activations once) against the copy bandwidth measured in the same run, and how far
the config's result is from the default's. Inputs are not rotated: a small batch's
adapter rows stay in L2 between iterations (its % of copy can pass 100); the e2e
step (`e2e_decode.py`) is the measure that counts.

    python benchmarks/tune_lora.py                 # the GPU sweep
    python benchmarks/tune_lora.py --quick         # tiny, any device
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.kernels_setup import (AdapterPool, copy_bandwidth, git_commit,  # noqa: E402
                                      measure, module_shapes, write_sweep)
from pallas_kernels import lora  # noqa: E402
from pallas_kernels import lora_mgpu as lm  # noqa: E402
from pallas_kernels import lora_plan as lp  # noqa: E402
from pallas_kernels.lora import TuningConfig  # noqa: E402
from slora_jax.config import MODULES  # noqa: E402

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"), "down": ("down",)}
RANKS = {"mixed": (8, 16, 32, 64), "r16": (16,), "r64": (64,), "r8": (8,)}
PAGE_SIZE = 16
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def setup(model, group, b, n, ranks, seed=0):
    """One step's inputs: b tokens over n distinct adapters (round robin, shuffled)."""
    mods = GROUPS[group]
    shapes = module_shapes(model)
    pool = AdapterPool(model, [ranks[i % len(ranks)] for i in range(n)], PAGE_SIZE, seed)
    rng = np.random.default_rng(seed)
    ts = jnp.asarray(rng.permutation(np.arange(b) % n), jnp.int32)
    idx = [MODULES.index(m) for m in mods]
    sl = np.arange(n)
    tabs = dict(
        slot_pages=jnp.asarray(pool.pages[sl], jnp.int32),
        a_offsets=jnp.asarray(pool.offsets[sl][:, idx, 0], jnp.int32),
        b_offsets=jnp.asarray(pool.offsets[sl][:, idx, 1], jnp.int32),
        ranks=jnp.asarray(np.repeat(pool.ranks[sl, None], len(idx), 1), jnp.int32),
        scales=jnp.ones((n, len(idx)), jnp.float32))
    k_in = shapes[mods[0]][0]
    widths = tuple(shapes[m][1] for m in mods)
    x = jax.random.normal(jax.random.key(seed), (b, k_in), jnp.bfloat16)
    # The step's plan (`model.lora_plans`). A decode step that groups its tokens does it
    # once for all layers (`step.decode`): the layer's tokens come ordered by adapter.
    grouped = lora.sorts_tokens(b)
    if grouped:
        ts = jnp.sort(ts)
    plan = jax.jit(lambda ts, t: lora.make_plan(
        ts, t["slot_pages"], t["a_offsets"], t["b_offsets"], t["ranks"], t["scales"],
        widths=widths, k_in=k_in, max_rank=pool.max_rank, page_size=PAGE_SIZE,
        rows_shape=pool.rows.shape, tokens=lora.token_plan(ts, n, grouped=grouped)))(ts, tabs)
    gp = plan.kernel
    # Bytes each kernel must move: every item's rank rows once (8-row groups), x / out once.
    tp = jax.tree.map(np.asarray, gp.tokens)
    used = (tp.item_hi > tp.item_lo) & (tp.item_slot < n)
    r8 = -(-pool.ranks[tp.item_slot[used]] // 8) * 8
    shrink_bytes = int(r8.sum()) * len(mods) * k_in * 2 + b * k_in * 2
    expand_bytes = sum(int(r8.sum()) * w * 2 + b * w * 4 for w in widths)
    return pool, x, plan, widths, shrink_bytes, expand_bytes


def _changed(cfg: TuningConfig | None):
    """The fields of `cfg` that differ from the defaults (JSON), or None for the defaults."""
    if cfg is None:
        return None
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != f.default} or None


def run_shape(model, group, b, n, rank_kind, configs, iters, copy_gbps, budget_end):
    pool, x, plan, widths, sb, eb = setup(model, group, b, n, RANKS[rank_kind])
    gp = plan.kernel
    rows_ = pool.rows
    out = []
    base = dict(model=model, group=group, b=b, adapters=n, ranks=rank_kind)

    ref = {}

    def record(kind, cfg, f, args, nbytes, kernel, value=None):
        try:
            us, per = measure(f, args, iters)
            diff = None
            if value is not None:     # what the config computes, against the default's
                v = np.asarray(value(), np.float32)
                ref.setdefault(kind, v)
                # relative to the default's largest value (xs is bf16: one rounding
                # flip of a split sum that adds in another order is 2^-8 of a value)
                diff = float(np.abs(v - ref[kind]).max() / max(np.abs(ref[kind]).max(), 1e-30))
        except Exception as e:      # a config the compiler rejects: say so, go on
            print(f"  {base} {kind} {cfg}: {type(e).__name__}: {str(e)[:160]}")
            return
        k_us = next((v for k, v in per.items() if kernel in k), us) if per else us
        out.append(dict(base, kind=kind, config=_changed(cfg) or "default", us=us, kernel_us=k_us,
                        bytes=nbytes, rel_diff_vs_default=diff, pct_copy=nbytes / (k_us * 1e-6) / 1e9 / copy_gbps * 100))

    default = TuningConfig()
    f_all = jax.jit(lambda x, rows, plan: lora.lora_apply(x, rows, plan))
    record("apply", None, f_all, (x, rows_, plan), sb + eb, "")
    out_s = jax.jit(lambda x, rows, gp: lm._shrink_launch(gp, x, rows, default, None))(
        x, rows_, gp)
    mods = [j for j in range(len(widths)) if widths[j] == widths[0]]
    xs = jax.jit(lambda o, gp: lp.xs_from_shrink(gp, o, mods, rows_.dtype))(out_s, gp)
    e_bytes = eb * len(mods) // len(widths)
    for cfg in [None] + configs["shrink"]:
        if time.perf_counter() > budget_end:
            break
        f = jax.jit(lambda x, rows, gp, cfg=cfg: lm._shrink_launch(gp, x, rows, cfg or default,
                                                                    None))
        # The chunks a split layout leaves unwritten differ by config: compare the
        # expand's input built from them, which reads only the live rows.
        record("shrink", cfg, f, (x, rows_, gp), sb, "shrink", lambda f=f: lp.xs_from_shrink(
            gp, f(x, rows_, gp), mods, rows_.dtype))
    for cfg in [None] + configs["expand"]:
        if time.perf_counter() > budget_end:
            break
        f = jax.jit(lambda xs, rows, gp, cfg=cfg: lm._expand_launch(
            gp, xs, rows, mods, widths[0], cfg or default, None))
        record("expand", cfg, f, (xs, rows_, gp), e_bytes, "expand",
               lambda f=f: f(xs, rows_, gp))
    return out


def run_apply_sweep(model, group, b, n, rank_kind, shrink_blocks, iters, budget_end):
    """The whole lora_apply (shrink, the XLA that builds the expand's input, expand)
    under each `TuningConfig.shrink_blocks` (fewer blocks: fewer K splits for the xs to
    sum), beside the jnp reference (gather each token's rows, padded einsum) on the same
    inputs."""
    pool, x, plan, widths, sb, eb = setup(model, group, b, n, RANKS[rank_kind])
    base = dict(model=model, group=group, b=b, adapters=n, ranks=rank_kind)
    out = []
    ref_plan = plan.replace(kernel=None)
    ref_f = jax.jit(lambda x, rows, plan: lora.lora_apply(x, rows, plan))
    us, _ = measure(ref_f, (x, pool.rows, ref_plan), iters)
    want = [np.asarray(y, np.float32) for y in ref_f(x, pool.rows, ref_plan)]
    scale = max(float(np.abs(w).max()) for w in want) or 1.0
    out.append(dict(base, kind="xla", config="reference", us=us, splits=None))
    for blocks in shrink_blocks:
        if time.perf_counter() > budget_end:
            break
        cfg = TuningConfig(shrink_blocks=blocks)
        f = jax.jit(lambda x, rows, plan, cfg=cfg: lora.lora_apply(x, rows, plan, cfg))
        splits = jax.eval_shape(lambda x, rows, gp: lm._shrink_launch(gp, x, rows, cfg, None),
                                x, pool.rows, plan.kernel).shape[0]
        try:
            us, per = measure(f, (x, pool.rows, plan), iters)
        except Exception as e:    # a config the compiler rejects: say so, go on
            print(f"  {base} shrink_blocks={blocks}: {type(e).__name__}: {str(e)[:160]}")
            continue
        got = f(x, pool.rows, plan)
        diff = max(float(np.abs(np.asarray(g, np.float32) - w).max())
                   for g, w in zip(got, want)) / scale
        out.append(dict(base, kind="apply", config=dict(shrink_blocks=blocks), us=us,
                        splits=splits, kernels_us=per, rel_diff_vs_xla=diff))
    return out


def _sweep_table(rows):
    lines = [f"# decode LoRA apply: the shrink's K splits "
             f"({jax.devices()[0].device_kind}, JAX {jax.__version__}, commit "
             f"{git_commit()[:10]})", "", f"`{' '.join(sys.argv)}`; us of the whole "
             "lora_apply (kernels and XLA glue), no L2 rotation", "",
             "| model | group | B | adapters | ranks | xla us | shrink blocks | shrink splits "
             "| us | xla/us |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, grp in itertools.groupby(rows, key=lambda r: (r["model"], r["group"], r["b"],
                                                           r["adapters"], r["ranks"])):
        grp = list(grp)
        xla = next((r["us"] for r in grp if r["kind"] == "xla"), float("nan"))
        for r in grp:
            if r["kind"] == "apply":
                c = r["config"]
                lines.append(f"| {' | '.join(str(k) for k in key)} | {xla:.1f} | "
                             f"{c['shrink_blocks']} | {r['splits']} | {r['us']:.1f} | "
                             f"{xla / r['us']:.2f} |")
    return lines


def _short(cfg):
    if cfg == "default":
        return "default"
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="llama-7b:qkv:32:32:mixed,llama-7b:o:32:32:mixed,"
                    "llama-7b:qkv:128:128:mixed,llama-7b:qkv:256:256:r16,"
                    "llama-7b:qkv:32:1:r64")
    ap.add_argument("--splits", default="2,4,8,16")
    ap.add_argument("--lanes", default="1,2,4,8")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--block-k", default="256")
    ap.add_argument("--block-n", default="128,256")
    ap.add_argument("--budget-s", type=float, default=480, help="stop sweeping after this")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--apply-sweep", action="store_true",
                    help="time the whole apply under each --shrink-blocks "
                         "(TuningConfig.shrink_blocks) and the jnp reference, instead of "
                         "the kernel sweep")
    ap.add_argument("--shrink-blocks", default="132,66,33,16")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.splits, args.lanes, args.stages, args.block_k, args.block_n = (
            "tiny-mha:qkv:8:4:mixed", "1,2", "1,2", "2", "64", "64")
        args.iters = 2
    ints = lambda a: [int(v) for v in a.split(",")]   # noqa: E731
    configs = dict(
        shrink=[TuningConfig(shrink_splits=sp, shrink_lanes=ln, shrink_stages=st, block_k=bk)
                for sp, ln, st, bk in itertools.product(ints(args.splits), ints(args.lanes),
                                                        ints(args.stages), ints(args.block_k))],
        expand=[TuningConfig(expand_splits=sp, expand_stages=st, block_n=bn)
                for sp, st, bn in itertools.product(ints(args.splits), ints(args.stages),
                                                    ints(args.block_n))])
    copy_gbps = copy_bandwidth(args.iters)
    t0 = time.perf_counter()
    rows = []
    shapes = args.shapes.split(",")
    if args.apply_sweep:
        for i, shape in enumerate(shapes):
            model, group, b, n, rk = shape.split(":")
            rows += run_apply_sweep(model, group, int(b), int(n), rk,
                                    ints(args.shrink_blocks), args.iters, t0 + args.budget_s)
            write_sweep(args.out, "tune_lora_apply", rows, _sweep_table(rows), copy_gbps,
                        show=i == len(shapes) - 1)
        return
    for i, shape in enumerate(shapes):
        model, group, b, n, rk = shape.split(":")
        rows += run_shape(model, group, int(b), int(n), rk, configs, args.iters, copy_gbps,
                          t0 + args.budget_s)
        # After every shape, so that a run cut off by its caller keeps what it measured.
        write_sweep(args.out, "tune_lora", rows, _table(rows, copy_gbps), copy_gbps,
                    show=i == len(shapes) - 1)


def _table(rows, copy_gbps):
    lines = [f"# decode LoRA work-split sweep ({jax.devices()[0].device_kind}, JAX "
             f"{jax.__version__}, commit {git_commit()[:10]})", "",
             f"`{' '.join(sys.argv)}`; copy {copy_gbps:.0f} GB/s; kernel us and % of copy "
             "over the bytes the kernel must move", "",
             "| model | group | B | adapters | ranks | apply us | kernel | default us | "
             "default % copy | best config | best us | best % copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, grp in itertools.groupby(rows, key=lambda r: (r["model"], r["group"], r["b"],
                                                           r["adapters"], r["ranks"])):
        grp = list(grp)
        app = next((r["us"] for r in grp if r["kind"] == "apply"), float("nan"))
        for kind in ("shrink", "expand"):
            ks = [r for r in grp if r["kind"] == kind]
            d = next((r for r in ks if r["config"] == "default"), None)
            if not ks or d is None:
                continue
            best = min(ks, key=lambda r: r["kernel_us"])
            lines.append(f"| {' | '.join(str(k) for k in key)} | {app:.1f} | {kind} | "
                         f"{d['kernel_us']:.1f} | {d['pct_copy']:.0f} | {_short(best['config'])} "
                         f"| {best['kernel_us']:.1f} | {best['pct_copy']:.0f} |")
    return lines


if __name__ == "__main__":
    main()
