"""End-to-end decode step: LoRA on every request vs LoRA off vs a plain-XLA step.

For a Llama dummy model (default Llama-7B shapes, bf16) it times, in one run:
  * `slora`   : our `decode` step, every request with an adapter (mixed ranks on q/k/v/o,
                `--adapters` distinct adapters in the batch), pool donated;
  * `base`    : the same step with no adapter in the batch (the 0-slot bucket: no LoRA work);
  * `xla`     : a plain-XLA decode step on contiguous per-layer K/V caches (no pool, no LoRA),
                the "base model alone" ceiling.
Each step's GPU time is the sum of its kernels' CUPTI times (the CUPTI hooks that
`jax.experimental.mosaic.gpu.profiler.measure` uses, around a loop of `--iters` calls that
threads the donated pool/cache; wall time per pipelined step is recorded too), with the
HBM-read floor (weights + KV bytes over the copy bandwidth measured in the same run).
Prints a table and writes JSON + Markdown to
benchmarks/results/e2e_decode[_TAG]_<device>_<commit>.{json,md}.

    python benchmarks/e2e_decode.py --quick              # small shapes, any device
    make bench-e2e                                       # the GPU table (benchmarks/PERF.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.kernels_setup import result_stem  # noqa: E402
from slora_jax.adapters import dummy_adapter  # noqa: E402
from slora_jax.batching import Sampling, SlotInfo, decode_batch  # noqa: E402
from pallas_kernels.lora import TuningConfig  # noqa: E402
from slora_jax.config import EngineConfig, preset  # noqa: E402
from slora_jax.model import StepSpec, apply_rope, lm_logits, rms_norm, rope_inv_freq  # noqa: E402
from slora_jax.params import init_dummy_params, params_bytes  # noqa: E402
from slora_jax.pool import PoolLayout, init_pool, load_adapter_pages  # noqa: E402
from slora_jax.step import decode  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed_loop(step, state, n):
    """Run `state = step(state)` n times (donated state threaded through) and return
    (state, GPU µs per step from CUPTI kernel times or None, wall µs per step).

    CUPTI's `profiler.measure` makes its own warm-up call, which would consume the
    donated pool, so we bracket our own loop with its init/get-timings calls.
    """
    ext = None
    if jax.devices()[0].platform == "gpu":
        from jax._src.lib import mosaic_gpu as mgpu
        ext = mgpu._mosaic_gpu_ext
        ext._cupti_init()
    t = time.perf_counter()
    try:
        for _ in range(n):
            state = step(state)
        jax.block_until_ready(state)
    finally:
        timings = ext._cupti_get_timings(True) if ext is not None else None
    wall = (time.perf_counter() - t) / n * 1e6
    gpu = sum(ms for _, ms in timings) * 1e3 / n if timings else None
    if timings:
        by_name: dict[str, list] = {}
        for name, ms in timings:
            c = by_name.setdefault(name, [0, 0.0])
            c[0] += 1
            c[1] += ms * 1e3 / n
        timed_loop.last_breakdown = sorted(((us, cnt // n, name) for name, (cnt, us)
                                            in by_name.items()), reverse=True)
    return state, gpu, wall


def show_breakdown(name: str, top: int):
    """Print the `top` costliest kernels of the last timed loop; return them as rows."""
    bd = getattr(timed_loop, "last_breakdown", None)
    timed_loop.last_breakdown = None
    if not top or not bd:
        return None
    print(f"  costliest kernels of the {name} step (us/step, launches/step):")
    for us, cnt, kname in bd[:top]:
        print(f"    {us:9.1f} {cnt:5d}  {kname[:100]}")
    print(f"    {sum(c for _, c, _ in bd):5d} launches/step in all")
    return [{"us": us, "launches": cnt, "kernel": kname[:200]} for us, cnt, kname in bd[:top]]


def copy_bandwidth() -> float:
    n = (256 << 20) if jax.devices()[0].platform == "gpu" else (8 << 20)
    f = jax.jit(lambda a: a * 1.0001)
    x = f(jnp.ones((n,), jnp.float32)).block_until_ready()
    _, gpu, wall = timed_loop(f, x, 10)
    return 2 * x.nbytes / ((gpu or wall) * 1e-6) / 1e9


def xla_decode_step(mc):
    """Plain-XLA decode on contiguous caches k, v: [L][B, C, nkv, hd], donated."""
    inv = rope_inv_freq(mc)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, tokens, positions):
        b = tokens.shape[0]
        x = params.embed[tokens]
        new = []
        for lp, (kc, vc) in zip(params.layers, cache):
            h = rms_norm(x, lp.attn_norm, mc.rms_norm_eps)
            q = apply_rope((h @ lp.wq).reshape(b, mc.num_heads, mc.head_dim), positions, inv)
            k = apply_rope((h @ lp.wk).reshape(b, mc.num_kv_heads, mc.head_dim), positions, inv)
            v = (h @ lp.wv).reshape(b, mc.num_kv_heads, mc.head_dim)
            kc = kc.at[jnp.arange(b), positions].set(k)
            vc = vc.at[jnp.arange(b), positions].set(v)
            g = mc.num_heads // mc.num_kv_heads
            qg = q.reshape(b, mc.num_kv_heads, g, mc.head_dim)
            s = jnp.einsum("bhgd,bchd->bhgc", qg, kc, preferred_element_type=jnp.float32)
            s = s * mc.head_dim ** -0.5
            mask = jnp.arange(kc.shape[1])[None, :] <= positions[:, None]
            p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -1e30), -1).astype(x.dtype)
            att = jnp.einsum("bhgc,bchd->bhgd", p, vc).reshape(b, mc.q_size)
            x = x + att @ lp.wo
            h = rms_norm(x, lp.mlp_norm, mc.rms_norm_eps)
            x = x + (jax.nn.silu(h @ lp.w_gate) * (h @ lp.w_up)) @ lp.w_down
            new.append((kc, vc))
        x = rms_norm(x, params.final_norm, mc.rms_norm_eps)
        return tuple(new), jnp.argmax(lm_logits(params, x), -1)
    return step


def git_commit() -> str:
    env = os.environ.get("SLORA_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--verify", "-q", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def parse_variants(spec: str) -> dict[str, dict[str, int]]:
    """'unsorted_max_tokens=0,decode_block_tokens=64+shrink_blocks=66' -> {name:
    TuningConfig fields}; a bad field or value is refused by name."""
    fields = {f.name for f in dataclasses.fields(TuningConfig)}
    out = {}
    for name in filter(None, (v.strip() for v in spec.split(","))):
        opts = {}
        for part in name.split("+"):
            k, _, v = part.partition("=")
            if k not in fields or not v.isdigit():
                raise SystemExit(f"--lora-variants: '{part}' is not FIELD=INT for a field of "
                                 f"TuningConfig ({', '.join(sorted(fields))})")
            opts[k] = int(v)
        try:
            TuningConfig(**opts)
        except ValueError as e:
            raise SystemExit(f"--lora-variants: {e}") from None
        out[name] = opts
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-7b")
    ap.add_argument("--batches", default="32:512,128:512,256:256",
                    help="comma list of BATCH:CONTEXT")
    ap.add_argument("--adapters", default="1,32,256", help="distinct adapters in the batch")
    ap.add_argument("--ranks", default="8,16,32,64", help="ranks, assigned round-robin")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lora-backend", default="reference")
    ap.add_argument("--attention-backend", default="reference")
    ap.add_argument("--breakdown", type=int, default=0,
                    help="print the N costliest kernels of the LoRA step (GPU)")
    ap.add_argument("--max-block-tokens", type=int, default=None,
                    help="cap on the LoRA kernels' tokens per tile at decode "
                         "(TuningConfig.decode_block_tokens)")
    ap.add_argument("--lora-variants", default="",
                    help="comma-separated extra LoRA steps to time beside `slora`, each "
                         "TuningConfig fields joined by '+' (e.g. "
                         "'unsorted_max_tokens=0,decode_block_tokens=64+shrink_blocks=66')")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the preset's layer count (compile-time checks)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small shapes")
    ap.add_argument("--out", default=RESULTS, help="folder of the JSON + Markdown")
    ap.add_argument("--tag", default="",
                    help="name part of a run beside the main table (e.g. b1): results are "
                         "e2e_decode[_PRESET][_TAG]_<device>_<commit>.{json,md}")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batches, args.adapters, args.iters = "tiny", "4:64,8:32", "1,4", 3

    mc = preset(args.preset)
    variants = parse_variants(args.lora_variants)
    if args.layers:
        mc = dataclasses.replace(mc, num_layers=args.layers)
    dtype = jnp.bfloat16
    clock = "cupti" if jax.devices()[0].platform == "gpu" else "wall"
    params = init_dummy_params(mc, dtype)
    copy_gbps = copy_bandwidth()
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []

    def write_results():
        meta = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
                "jax": jax.__version__, "commit": git_commit(), "command": " ".join(sys.argv),
                "date": datetime.date.today().isoformat(),
                "clock": clock, "copy_GBps": copy_gbps, "preset": args.preset,
                "lora_backend": args.lora_backend, "attention_backend": args.attention_backend,
                "max_block_tokens": args.max_block_tokens, "layers": mc.num_layers,
                "lora_variants": {k: dict(v) for k, v in variants.items()}}
        os.makedirs(args.out, exist_ok=True)
        parts = [args.preset] if args.preset != "llama-7b" else []
        tag = result_stem("_".join(["e2e_decode", *parts, *filter(None, [args.tag])]),
                          meta["commit"])
        with open(os.path.join(args.out, tag + ".json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = [f"# e2e decode step, {args.preset} ({meta['device']}, JAX {meta['jax']}, "
                 f"commit {meta['commit'][:10]}, {meta['date']})", "",
                 f"`{meta['command']}` — {clock} timing, copy {copy_gbps:.0f} GB/s", "",
                 "lora/base bound: (weights + KV + each distinct adapter's q/k/v/o bytes) over "
                 "(weights + KV), the ratio a step that only moves bytes would reach.", "",
                 "| batch | ctx | adapters | slora µs | base µs | xla µs | lora/base | lora/base bound "
                 "| base/xla | floor µs | compile s |"
                 + "".join(f" {v} lora/base |" for v in variants),
                 "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(variants)]
        for r in rows:
            lines.append(f"| {r['batch']} | {r['context']} | {r['distinct_adapters']} | "
                         f"{r['slora_us']:.1f} | {r['base_us']:.1f} | {r['xla_us']:.1f} | "
                         f"{r['lora_overhead']:.2f} | {r['bytes_bound_ratio']:.2f} | "
                         f"{r['base_vs_xla']:.2f} | {r['hbm_floor_us']:.1f} | "
                         f"{r['compile_s']['slora']:.0f} |"
                         + "".join(f" {r['variants'][v]['lora_overhead']:.2f} |"
                                   for v in variants))
        with open(os.path.join(args.out, tag + ".md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return lines

    xstep = xla_decode_step(mc)       # one jit: a batch's adapter counts share its compile
    for bc in args.batches.split(","):
        b, ctx = map(int, bc.split(":"))
        for n_ad in [int(a) for a in args.adapters.split(",") if int(a) <= b]:
            ec = EngineConfig(page_size=16, num_pages=2, max_rank=max(ranks), max_batch=b,
                              lora_modules=("q", "k", "v", "o"),
                              max_context=ctx, max_adapters_per_batch=n_ad,
                              decode_buckets=(b,), lora_backend=args.lora_backend,
                              attention_backend=args.attention_backend)
            lay0 = PoolLayout.create(mc, ec)
            adapters = [dummy_adapter(mc, ranks[i % len(ranks)], ("q", "k", "v", "o"), seed=i,
                                      name=f"a{i}") for i in range(n_ad)]
            ad_pages = [lay0.adapter_pages_for(a.ranks) for a in adapters]
            kv_pages = lay0.kv_pages_for(ctx)
            ec = dataclasses.replace(ec, num_pages=1 + b * kv_pages + sum(ad_pages))
            lay = PoolLayout.create(mc, ec)
            pool = init_pool(lay, dtype)
            nxt, slots = 1, []
            for a, n in zip(adapters, ad_pages):
                r, rk, sc, off = a.pack(lay, np.float32)
                pages = np.arange(nxt, nxt + n, dtype=np.int32)
                nxt += n
                pool = load_adapter_pages(pool, jnp.asarray(pages), jnp.asarray(r, dtype))
                slots.append(SlotInfo(pages, rk, sc, off))
                del r
            kv = [np.arange(nxt + i * kv_pages, nxt + (i + 1) * kv_pages, dtype=np.int32)
                  for i in range(b)]
            pos = [ctx - 1] * b                    # attend over the full context
            samp = [Sampling()] * b
            tuning = TuningConfig(**({"decode_block_tokens": args.max_block_tokens}
                                     if args.max_block_tokens else {}))
            spec = StepSpec(mc, lay, args.lora_backend, args.attention_backend,
                            lora_tuning=tuning)
            lora_b = decode_batch(list(range(b)), pos, kv, [i % n_ad for i in range(b)], samp,
                                  slots, ec, lay)
            base_b = decode_batch(list(range(b)), pos, kv, [-1] * b, samp, slots, ec, lay)
            step = functools.partial(decode, spec=spec)
            res, wall, compile_s, breakdowns = {}, {}, {}, {}
            runs = [("slora", lora_b, step), ("base", base_b, step)] + [
                (v, lora_b, functools.partial(decode, spec=spec.with_(
                    lora_tuning=dataclasses.replace(tuning, **opts))))
                for v, opts in variants.items()]
            for name, batch, step in runs:
                t0 = time.perf_counter()
                pool, _ = step(params, pool, batch)            # compile + warm up
                jax.block_until_ready(pool)
                compile_s[name] = time.perf_counter() - t0
                pool, g, w = timed_loop(lambda p: step(params, p, batch)[0], pool, args.iters)
                res[name], wall[name] = (g or w), w
                breakdowns[name] = show_breakdown(name, args.breakdown)
            del pool
            cache = tuple((jnp.zeros((b, ctx, mc.num_kv_heads, mc.head_dim), dtype),
                           jnp.zeros((b, ctx, mc.num_kv_heads, mc.head_dim), dtype))
                          for _ in range(mc.num_layers))
            toks, posa = jnp.arange(b, dtype=jnp.int32), jnp.full((b,), ctx - 1, jnp.int32)
            cache, _ = xstep(params, cache, toks, posa)
            cache, g, w = timed_loop(lambda c: xstep(params, c, toks, posa)[0], cache, args.iters)
            res["xla"], wall["xla"] = (g or w), w
            breakdowns["xla"] = show_breakdown("xla", args.breakdown)
            del cache
            kv_bytes = b * ctx * 2 * mc.kv_size * 2 * mc.num_layers
            floor_us = (params_bytes(params) + kv_bytes) / (copy_gbps * 1e9) * 1e6
            # Bytes the LoRA terms must read: each distinct adapter's A and B once.
            shapes = dict(zip(("q", "k", "v", "o"), lay.module_shapes[:4]))
            lora_bytes = sum(a.ranks.get(m, 0) * (i + o) for a in adapters
                             for m, (i, o) in shapes.items()) * 2 * mc.num_layers
            lora_floor_us = lora_bytes / (copy_gbps * 1e9) * 1e6
            row = {"batch": b, "context": ctx, "distinct_adapters": n_ad, "ranks": ranks,
                   "slora_us": res["slora"], "base_us": res["base"], "xla_us": res["xla"],
                   "lora_overhead": res["slora"] / res["base"],
                   "base_vs_xla": res["base"] / res["xla"], "hbm_floor_us": floor_us,
                   "lora_bytes": lora_bytes, "lora_floor_us": lora_floor_us,
                   "bytes_bound_ratio": (floor_us + lora_floor_us) / floor_us,
                   "tokens_per_s": b / (res["slora"] * 1e-6),
                   "wall_us": wall, "compile_s": compile_s, "layers": mc.num_layers,
                   "variants": {v: {"us": res[v], "lora_overhead": res[v] / res["base"]}
                                for v in variants}}
            if args.breakdown:
                row["breakdown"] = breakdowns
            rows.append(row)
            print(f"B={b:4d} ctx={ctx:5d} adapters={n_ad:4d}  slora {res['slora']:9.1f} us  "
                  f"base {res['base']:9.1f} us  xla {res['xla']:9.1f} us  "
                  f"lora/base {row['lora_overhead']:.2f} (bytes bound "
                  f"{row['bytes_bound_ratio']:.2f})  base/xla {row['base_vs_xla']:.2f}  "
                  f"compile {compile_s['slora']:.0f}s/{compile_s['base']:.0f}s"
                  + "".join(f"  [{v}] {res[v] / res['base']:.2f}" for v in variants), flush=True)
            write_results()            # partial results survive a cut-off run

    lines = write_results()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
