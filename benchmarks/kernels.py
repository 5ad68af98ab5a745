"""Kernel benchmark: Mosaic GPU LoRA and attention kernels against XLA and library baselines.

Times, in one run and with CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`):
  * LoRA shrink and expand at decode (one token per request, B up to 512, distinct
    adapters drawn from a pool of `--adapters` loaded adapters), attention modules
    (q, or o and v under GQA) and MLP modules (gate: in H / out F, down: in F / out H),
    ranks 8..64 and mixed. Decode batches that the step would group by adapter
    (`lora.sorts_tokens`) come in slot order. Backends:
      - `pallas`         : `pallas_kernels.lora.lora_shrink/lora_expand(backend="pallas")`,
                           the whole call (XLA plan + kernel); `kernel_us` = the Mosaic
                           kernel alone. `fallback` = true when the dispatch used the
                           reference for this shape (no Pallas kernel in the jaxpr);
      - `pallas-planned` : the kernel with the step's plan built outside (what one module
                           pays in a step, where XLA builds the plan once for all layers);
      - `pallas-layer`   : `lora_apply` only (decode and prefill): the step's plan
                           (`lora.token_plan`, `lora.make_plan`) built outside, as a step
                           builds it once for all layers: what one layer pays;
      - `xla-gather`     : baseline (a), the jnp reference (backend="reference");
      - `xla-onehot`     : baseline (b), one-hot einsum over stacked padded slots.
  * LoRA at prefill (segments of 256..2048 tokens, one adapter each; 512, 2048, 8192
    tokens), module q: `pallas-planned`, `xla-gather`, and `dense` (one plain matmul of
    the same tokens and rank:
    x[T,H]·A[H,r], xa[T,r]·B[r,out]; the target is LoRA within 1.5x of it, `vs_dense`),
    `ragged-dot` (`jax.lax.ragged_dot`, weights stacked per segment [G, H, r]) and
    `tokamax` (`tokamax.ragged_dot`, when tokamax is installed). Mixed ranks: dense and
    ragged-dot at the max rank.
  * Decode attention over pool pages (Llama-7B MHA, Llama-3-8B GQA), 1K..16K context:
    `pallas` (paged_attention_mgpu), `triton-paged` (JAX's Pallas-Triton paged attention
    on the same K/V as [n_kv, pages, tokens_per_page, hd]), `xla-gather` (reference),
    `xla-contig` (XLA on contiguous K/V, no paging).
  * Causal prefill attention over packed prompts: `pallas` (the dispatch; it may still
    fall back to the reference), `xla-ref` (reference, T <= 2048), `cudnn`
    (`jax.nn.dot_product_attention(implementation="cudnn")` on [B, S, N, hd]),
    `mgpu-flash` (`jax.experimental.pallas.ops.gpu.attention_mgpu`, causal).
Bytes are the fewest an op must move: each distinct adapter once at its own rank, each
KV byte once, activations in and out. `achieved_GBps` = bytes / median time, beside the
copy bandwidth measured in the same run (XLA, 1 GiB, read + write). Prefill rows also
have `flops` (LoRA: each token at its adapter's rank; dense/ragged-dot: at the rank they
compute; attention: the causal half) and `tflops`, beside a dense bf16 8192^3 matmul
measured in the same run (`matmul_tflops`). To keep inputs out of the 50 MB L2, each
timed call runs the op on several independent batches and divides the time. `wall_s` is
a row's wall time (tracing, compiling and timing), for planning runs.

The whole default run fits one device call: config groups run in priority order (decode
LoRA at B >= 128, MLP, prefill LoRA, decode attention at 4K+, prefill attention, then
the rest), each up to its share of `--budget-s`; configs left out are listed and written
as `skipped` rows. `--only` picks families: lora (decode, MLP, one-hot), lora-prefill,
attention (decode), prefill-attention.

    python benchmarks/kernels.py --quick      # CPU: tiny stand-ins through the interpreter
    python benchmarks/kernels.py              # the GPU run; writes benchmarks/results/
                                              # kernels_<device>_<commit>.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

T_START = time.time()     # run as a script, the budget counts from here (JAX start-up included)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_attention import run_attention, run_prefill_attention  # noqa: E402
from kernels_setup import (MIXED_RANKS, ON_GPU, PAGE_SIZE, AdapterPool,  # noqa: E402
                           add_ratios, copy_bandwidth, desc, error_text, fmt_row, git_commit,
                           groups, matmul_rate, measure, randn, repeats, summary, uses_kernel,
                           write_results)
from pallas_kernels import lora, lora_mgpu  # noqa: E402

FAMILIES = ("lora", "lora-prefill", "attention", "prefill-attention")
TIER_A_FRACTION = 0.9     # of the budget for the priority groups; the rest runs after


def _tokamax():
    try:
        import tokamax
        return tokamax
    except Exception:
        return None


class Runner:
    """Times rows and keeps them; honours the time budget and the --backends filter."""

    def __init__(self, args, copy_gbps, mm_tflops):
        self.args, self.copy, self.mm = args, copy_gbps, mm_tflops
        # In-process (main() called by a test or a notebook) it counts from the call.
        self.t0 = T_START if __name__ == "__main__" else args.t_main
        self.rows: list[dict] = []
        self.backends = set(args.backends.split(",")) if args.backends else None

    def over(self, deadline=None):
        now = time.time()
        return now > self.t0 + self.args.budget_s or (deadline is not None and now > deadline)

    def emit(self, name, backend, params, f=None, fargs=(), *, reps=1, nbytes=0, flops=None,
             check_kernel=False, fallback=None, skip=None, error=None):
        if self.backends and backend not in self.backends:
            return None
        row = dict(name=name, backend=backend, phase=params.get("phase", "decode"),
                   params=params, bytes=int(nbytes), copy_GBps=round(self.copy, 1),
                   matmul_tflops=round(self.mm, 1))
        if flops:
            row["flops"] = int(flops)
        if fallback is not None:
            row["fallback"] = bool(fallback)
        if skip is None and error is None and self.over():
            skip = "time budget"
        if skip or error:
            row.update({"skipped": skip} if skip else {"error": error})
        else:
            t = time.time()
            try:
                if check_kernel:
                    row["fallback"] = not uses_kernel(f, fargs)
                us, kernels = measure(f, fargs, self.args.iters)
                per = us / reps
                gbps = nbytes / per / 1e3
                row.update(median_us=round(per, 2), achieved_GBps=round(gbps, 1),
                           pct_copy=round(100 * gbps / self.copy, 1),
                           kernels_us={k: round(v / reps, 2) for k, v in kernels.items()})
                mg = [v for k, v in kernels.items() if k.startswith("mgpu_")]
                if mg:
                    row["kernel_us"] = round(sum(mg) / reps, 2)
                if flops:
                    tf = flops / per / 1e6
                    row.update(tflops=round(tf, 2), pct_matmul=round(100 * tf / self.mm, 1))
            except Exception as e:   # a failed config is a result too; keep going
                row["error"] = error_text(e)
            row["wall_s"] = round(time.time() - t, 1)
        self.rows.append(row)
        print(fmt_row(row), flush=True)
        return row


# --- LoRA -------------------------------------------------------------------------------

def run_lora(cfg, pool, R):
    """Shrink/expand rows of one batch config, for each (op, module) in cfg["ops"]."""
    t, n, ps, max_rank = cfg["b"], cfg["n"], pool.page_size, pool.max_rank
    prefill = cfg["phase"] == "prefill"
    # A decode step that groups its tokens by adapter sorts its rows before the layers
    # (`step.decode`): the layers get them in slot order.
    grouped = not prefill and lora.sorts_tokens(t)
    rng = np.random.default_rng(zlib.crc32(json.dumps(cfg, sort_keys=True).encode()))
    widths = [pool.shapes[mod][0 if op == "shrink" else 1] for op, mod in cfg["ops"]]
    k = repeats(int(n * pool.ranks.mean() * max(widths) * 2 + t * max(widths) * 2))
    batches = []
    for _ in range(k):
        adapters = rng.choice(len(pool), n, replace=False)
        ts = np.repeat(np.arange(n), cfg["segs"]) if prefill else rng.permutation(t) % n
        batches.append((adapters, jnp.asarray(np.sort(ts) if grouped else ts, jnp.int32)))
    used = float(np.mean([pool.ranks[a].sum() for a, _ in batches]))   # every slot has tokens
    tok_rank = float(np.mean([pool.ranks[a][np.asarray(ts)].sum() for a, ts in batches]))
    params = {kk: v for kk, v in cfg.items() if kk != "ops"}
    params.update(max_rank=max_rank, repeats=k)
    if prefill:
        params["dense_rank"] = max_rank
    keys = iter(range(1 << 20))
    xs = {}
    xa = [jax.random.normal(jax.random.key(i), (t, max_rank), jnp.float32) for i in range(k)]
    scale = jnp.full((n,), 0.5, jnp.float32)
    for op, mod in cfg["ops"]:
        w_in, w_out = pool.shapes[mod]
        width = w_in if op == "shrink" else w_out
        # At prefill the plan is shared by every module and layer: planned only.
        backends = ("pallas-planned", "xla-gather") if prefill \
            else ("pallas", "pallas-planned", "xla-gather")
        p = dict(params, module=mod, width=width)
        if op == "shrink" and w_in not in xs:
            xs[w_in] = [randn(jax.random.key(1000 + next(keys)), (t, w_in)) for _ in range(k)]
        bs = [((xs[w_in][i] if op == "shrink" else xa[i]),
               *pool.slots(a, mod, "a" if op == "shrink" else "b"), scale, ts)
              for i, (a, ts) in enumerate(batches)]
        if op == "shrink":
            nbytes = used * width * 2 + t * width * 2 + t * max_rank * 4
        else:
            nbytes = used * width * 2 + t * max_rank * 4 + t * width * 4
        flops = 2 * width * tok_rank if prefill else None
        name = f"lora_{op}"
        try:
            plans = jax.jit(lambda rows, bs: [_module_plan(
                op, rows, *b, n=n, max_rank=max_rank, width=width, ps=ps, prefill=prefill,
                grouped=grouped) for b in bs])(pool.rows, bs)
            plan_err = None
        except Exception as e:
            plans, plan_err = None, error_text(e)
        fell_back = False
        for backend in backends:
            common = dict(reps=k, nbytes=nbytes, flops=flops)
            if backend == "pallas-planned" and plans is None:
                R.emit(name, backend, p, error=f"plan: {plan_err}", **common)
                continue
            if backend.startswith("pallas") and fell_back:   # the other pallas row did
                R.emit(name, backend, p, skip="falls back to the reference, as the other "
                       "pallas row", fallback=True, **common)
                continue
            f = _lora_fn(op, backend, max_rank, width, ps)
            pl_ = plans if backend == "pallas-planned" else [None] * k
            row = R.emit(name, backend, p, f, (pool.rows, bs, pl_),
                         check_kernel=backend.startswith("pallas"), **common)
            fell_back = fell_back or bool(row and row.get("fallback"))
        if prefill:
            _prefill_baselines(name, op, p, t, width, max_rank, cfg["segs"], k, R)
    _run_apply(cfg, pool, R, params, batches, xs, scale, used, k, prefill, grouped, tok_rank)


def _run_apply(cfg, pool, R, params, batches, xs, scale, used, k, prefill, grouped, tok_rank):
    """lora_apply (the module's whole LoRA term, shrink then expand): the kernels with
    the step's plan built outside the timed call, as a step builds it once for all
    layers (`pallas-layer`: what one layer pays), and the reference (`xla-gather`,
    decode) or one dense x·A·B at the max rank (`dense`, prefill: the target is LoRA
    within 1.5x of it)."""
    t, n, ps, max_rank = cfg["b"], cfg["n"], pool.page_size, pool.max_rank
    mods = [m for m in dict.fromkeys(mod for _, mod in cfg["ops"])
            if ("shrink", m) in cfg["ops"] and ("expand", m) in cfg["ops"]]
    for mod in mods:
        w_in, w_out = pool.shapes[mod]
        p = dict(params, module=mod, width=w_out, width_in=w_in)
        bs = []
        for i, (a, ts) in enumerate(batches):
            pages, a_off, rank = pool.slots(a, mod, "a")[:3]
            b_off = pool.slots(a, mod, "b")[1]
            bs.append((xs[w_in][i], pages, a_off, b_off, rank, scale, ts))
        nbytes = used * (w_in + w_out) * 2 + t * w_in * 2 + t * w_out * 4
        flops = 2 * tok_rank * (w_in + w_out) if prefill else None
        for backend in ("pallas-layer",) + (() if prefill else ("xla-gather",)):
            pallas = backend == "pallas-layer"

            def plan_of(rows, x, pages, a_off, b_off, rank, sc, ts, pallas=pallas):
                tokens = lora.token_plan(ts, n, prefill=prefill, grouped=grouped) \
                    if pallas else None
                return lora.make_plan(ts, pages, a_off[:, None], b_off[:, None], rank[:, None],
                                      sc[:, None], widths=(w_out,), k_in=w_in,
                                      max_rank=max_rank, page_size=ps, rows_shape=rows.shape,
                                      tokens=tokens)
            try:
                plans = jax.jit(lambda rows, bs: [plan_of(rows, *b) for b in bs])(pool.rows, bs)
            except Exception as e:
                R.emit("lora_apply", backend, p, error=f"plan: {error_text(e)}", reps=k,
                       nbytes=nbytes, flops=flops)
                continue
            f = jax.jit(lambda rows, bs, plans: [lora.lora_apply(b[0], rows, q)[0]
                                                 for b, q in zip(bs, plans)])
            R.emit("lora_apply", backend, dict(p, grouped=grouped) if pallas else p, f,
                   (pool.rows, bs, plans), check_kernel=pallas, reps=k, nbytes=nbytes,
                   flops=flops)
        if prefill:
            _apply_dense(p, R, xs[w_in], t, w_in, w_out, max_rank, k)


def _apply_dense(p, R, xs, t, w_in, w_out, r, k):
    """`dense` lora_apply at prefill: x[T, in]·A[in, r], rounded, ·B[r, out] (f32 out)."""
    key = jax.random.key(t + w_in + w_out + r)
    ws = [(randn(jax.random.fold_in(key, i), (w_in, r)),
           randn(jax.random.fold_in(key, 50 + i), (r, w_out))) for i in range(k)]

    def one(x, a, b):
        xa = jnp.dot(x, a, preferred_element_type=jnp.float32).astype(x.dtype)
        return jnp.dot(xa, b, preferred_element_type=jnp.float32)
    R.emit("lora_apply", "dense", dict(p, dense_rank=r),
           jax.jit(lambda xs, ws: [one(x, a, b) for x, (a, b) in zip(xs, ws)]), (xs, ws),
           reps=k, nbytes=t * w_in * 2 + (w_in + w_out) * r * 2 + t * w_out * 4,
           flops=2 * t * r * (w_in + w_out))


def _module_plan(op, rows, act, pages, off, rank, scale, ts, *, n, max_rank, width, ps,
                 prefill, grouped):
    """One module's plan as a step builds it (`lora.token_plan`, `lora.make_plan`), for
    `pallas-planned`: the shrink's (k_in = width) or the expand's (out = width)."""
    shrink = op == "shrink"
    col = lambda a: a[:, None]                                   # noqa: E731
    tokens = lora.token_plan(ts, n, prefill=prefill, grouped=grouped)
    return lora.make_plan(ts, pages, col(off) if shrink else None, None if shrink else col(off),
                          col(rank), col(scale), widths=() if shrink else (width,),
                          k_in=width if shrink else None, max_rank=max_rank, page_size=ps,
                          rows_shape=rows.shape, tokens=tokens)


def _lora_fn(op, backend, max_rank, width, ps):
    """The timed call of `backend` over k batches: f(rows, batches, plans)."""
    be = "reference" if backend == "xla-gather" else "pallas"
    config = lora.TuningConfig()

    def one(rows, act, pages, off, rank, scale, ts, plan):
        if backend == "pallas-planned" and not lora_mgpu.why_not(plan.kernel, rows, ps, config):
            if op == "shrink":
                return lora_mgpu.lora_shrink(act, rows, plan.kernel, config)[0]
            return lora_mgpu.lora_expand(act[None], rows, plan.kernel, config)[0]
        if op == "shrink":
            return lora.lora_shrink(act, rows, pages, off, rank, ts, max_rank=max_rank,
                                    page_size=ps, backend=be)
        return lora.lora_expand(act, rows, pages, off, rank, scale, ts, out_features=width,
                                page_size=ps, backend=be)
    return jax.jit(lambda rows, bs, plans: [one(rows, *b, pl_) for b, pl_ in zip(bs, plans)])


def _prefill_baselines(name, op, p, t, width, r, segs, k, R):
    """dense, ragged-dot and tokamax for one prefill op: bf16 in, f32 out, rank r."""
    g = len(segs)
    gs = jnp.asarray(segs, jnp.int32)
    key = jax.random.key(t + width + r)
    if op == "shrink":          # x[T, in] · A[in, r]
        acts = [randn(jax.random.fold_in(key, i), (t, width)) for i in range(k)]
        wshape, act_b, out_b = (width, r), t * width * 2, t * r * 4
    else:                       # xa[T, r] · B[r, out]
        acts = [randn(jax.random.fold_in(key, i), (t, r)) for i in range(k)]
        wshape, act_b, out_b = (r, width), t * r * 2, t * width * 4
    flops = 2 * t * width * r
    dense_w = [randn(jax.random.fold_in(key, 100 + i), wshape) for i in range(k)]
    R.emit(name, "dense", p, jax.jit(lambda ws, xs: [
        jnp.dot(x, w, preferred_element_type=jnp.float32) for x, w in zip(xs, ws)]),
        (dense_w, acts), reps=k, nbytes=act_b + width * r * 2 + out_b, flops=flops)
    del dense_w
    stacked = [randn(jax.random.fold_in(key, 200 + i), (g, *wshape)) for i in range(k)]
    nbytes = act_b + g * width * r * 2 + out_b
    R.emit(name, "ragged-dot", p, jax.jit(lambda ws, xs: [
        jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
        for x, w in zip(xs, ws)]), (stacked, acts), reps=k, nbytes=nbytes, flops=flops)
    tk = _tokamax()
    if tk is not None:
        def tk_dot(x, w):
            try:
                return tk.ragged_dot(x, w, group_sizes=gs, preferred_element_type=jnp.float32)
            except TypeError:
                return tk.ragged_dot(x, w, group_sizes=gs).astype(jnp.float32)
        R.emit(name, "tokamax", p, jax.jit(lambda ws, xs: [tk_dot(x, w) for x, w in zip(xs, ws)]),
               (stacked, acts), reps=k, nbytes=nbytes, flops=flops)


def run_onehot(cfg, R):
    """Baseline (b): vLLM-style stacked padded slots, selected by a one-hot einsum."""
    b, n_slots, rank, h = cfg["b"], cfg["n_slots"], cfg["rank"], cfg["h"]
    key = jax.random.key(n_slots)
    a = jax.random.normal(key, (n_slots, h, rank), jnp.bfloat16)
    bm = jax.random.normal(key, (n_slots, rank, h), jnp.bfloat16)
    x = jax.random.normal(key, (b, h), jnp.bfloat16)
    ts = jnp.asarray(np.random.default_rng(0).integers(0, n_slots, b), jnp.int32)

    @jax.jit
    def f(a, bm, x, ts):
        oh = jax.nn.one_hot(ts, n_slots, dtype=x.dtype)
        xa = jnp.einsum("th,nhr,tn->tr", x, a, oh, preferred_element_type=jnp.float32)
        return jnp.einsum("tr,nro,tn->to", xa.astype(x.dtype), bm, oh,
                          preferred_element_type=jnp.float32)
    distinct = len(np.unique(np.asarray(ts)))
    nbytes = distinct * rank * h * 2 * 2 + b * h * 2 + b * h * 4
    R.emit("lora_shrink+expand", "xla-onehot", dict(phase="decode", b=b, n=n_slots, rank=rank,
                                                    h=h, distinct=distinct),
           f, (a, bm, x, ts), nbytes=nbytes)


# --- driver -------------------------------------------------------------------------------

def run_config(g, c, R, pools, n_adapters):
    if g["label"] == "lora-onehot":
        run_onehot(c, R)
    elif g["family"].startswith("lora"):
        key = (c["model"], c["rank"])
        if key not in pools:
            pools.clear()                       # one pool at a time
            ranks = (np.random.default_rng(1).choice(MIXED_RANKS, n_adapters)
                     if c["rank"] == "mixed" else np.full(n_adapters, c["rank"]))
            pools[key] = AdapterPool(c["model"], ranks, PAGE_SIZE, seed=7)
        run_lora(c, pools[key], R)
    elif g["family"] == "attention":
        run_attention(c, R)
    else:
        run_prefill_attention(c, R)


def main(argv=None):
    t_main = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="a few small configs")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per config (median); default 20 on the GPU, 1 off it")
    ap.add_argument("--adapters", type=int, default=2000,
                    help="adapters loaded in the pool (at most 64 off the GPU)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated kernel families: {', '.join(FAMILIES)}")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="stop starting new configs after this many seconds (each group "
                         "of configs gets a share; configs left out are listed)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends to time (default: all)")
    ap.add_argument("--out", default=None,
                    help="JSON path, or a folder for the default name (default: "
                         "benchmarks/results/kernels[_FAMILIES]_<device>_<commit>.json)")
    args = ap.parse_args(argv)
    args.t_main = t_main
    only = set(args.only.split(",")) if args.only else set(FAMILIES)
    if only - set(FAMILIES):
        ap.error(f"--only: unknown {sorted(only - set(FAMILIES))} (have {', '.join(FAMILIES)})")
    if args.iters is None:
        args.iters = 20 if ON_GPU else 1
    n_adapters = args.adapters if ON_GPU else min(args.adapters, 64)
    dev = jax.devices()[0]
    device = getattr(dev, "device_kind", dev.platform)
    commit = os.environ.get("SLORA_COMMIT") or os.environ.get("GIT_COMMIT") or git_commit()
    copy_gbps, mm = copy_bandwidth(args.iters), matmul_rate(args.iters)
    print(f"device={device} jax={jax.__version__} commit={commit} copy={copy_gbps:.0f} GB/s "
          f"matmul={mm:.1f} TFLOP/s (bf16)", flush=True)
    if "lora-prefill" in only and _tokamax() is None:
        print("tokamax is not installed: skipping the tokamax ragged_dot baseline", flush=True)
    if not ON_GPU:
        print("off the GPU: skipping triton-paged, cudnn and mgpu-flash (GPU only)", flush=True)
    R = Runner(args, copy_gbps, mm)
    todo = [g for g in groups(args.quick) if g["family"] in only]
    has_b = any(g["tier"] == "b" for g in todo)
    total = sum(g["share"] for g in todo if g["tier"] == "a") or 1.0
    cum, skipped, pools = 0.0, [], {}
    for g in todo:
        if g["tier"] == "a":
            cum += g["share"]
            frac = (TIER_A_FRACTION if has_b else 1.0) * cum / total
        else:
            frac = 1.0
        deadline = R.t0 + args.budget_s * frac
        print(f"== {g['label']}: {len(g['configs'])} configs, until "
              f"{deadline - R.t0:.0f} s (now {time.time() - R.t0:.0f} s)", flush=True)
        if not g["family"].startswith("lora"):
            pools.clear()                       # free the adapter pool for the KV caches
        for c in g["configs"]:
            if R.over(deadline):
                skipped.append((g["label"], c))
                R.rows.append(dict(name=g["label"], backend="*", phase=c.get("phase", ""),
                                   params={kk: v for kk, v in c.items() if kk != "ops"},
                                   skipped="time budget"))
                continue
            try:
                run_config(g, c, R, pools, n_adapters)
            except Exception as e:   # setup failed (e.g. out of memory): say so, go on
                pools.clear()
                R.rows.append(dict(name=g["label"], backend="*", phase=c.get("phase", ""),
                                   params={kk: v for kk, v in c.items() if kk != "ops"},
                                   error=error_text(e)))
                print(f"{g['label']}: {desc(c)} ERROR {error_text(e)}", flush=True)
    pools.clear()
    if skipped:
        print(f"\nSKIPPED (time budget, {args.budget_s:.0f} s): {len(skipped)} configs", flush=True)
        for label, c in skipped:
            print(f"  {label}: {desc({kk: v for kk, v in c.items() if kk != 'ops'})}")
    add_ratios(R.rows)
    write_results(R.rows, args, device, commit, copy_gbps, mm)
    summary(R.rows, copy_gbps, mm)


if __name__ == "__main__":
    main()
