"""Kernel benchmark: Mosaic GPU LoRA (shrink/expand) and paged decode attention vs XLA.

Times, in one run and with CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`):
  * LoRA shrink and expand of one module at decode (one token per request, B up to
    512, distinct adapters drawn from a pool of `--adapters` loaded adapters) and at
    prefill (segments of many tokens per adapter), ranks 8/16/32/64 and mixed:
      - `pallas`     : pallas_kernels.lora_mgpu (the whole call: XLA plan + kernel),
                       with `kernel_us` = the Mosaic kernel alone (what a step pays per
                       module once XLA shares the plan between modules);
      - `xla-gather` : baseline (a), the jnp reference (gather per token + padded einsum);
      - `xla-onehot` : baseline (b), one-hot einsum over stacked padded slots [n, H, r].
  * Decode attention over pool pages (Llama-7B MHA and Llama-3-8B GQA):
      - `pallas`     : pallas_kernels.paged_attention_mgpu;
      - `xla-gather` : the jnp reference (gathers the pages, then attends);
      - `xla-contig` : baseline (d), XLA attention on contiguous K/V [B, ctx, nkv, hd].
Bytes are the fewest an op must move: each distinct adapter once at its own rank, each
KV byte once, activations in and out. `achieved_GBps` = bytes / median time, beside
the copy bandwidth measured in the same run (XLA, 1 GiB, read + write). To keep inputs
out of the 50 MB L2, each timed call runs the op on several independent batches
(different adapters / pages) and the time is divided by their number.

    python benchmarks/kernels.py --quick      # a few small configs (CPU: interpreter)
    python benchmarks/kernels.py              # the GPU run; writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import lora, lora_mgpu, paged_attention, paged_attention_mgpu  # noqa: E402
from slora_jax.pool import PoolLayout  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ON_GPU = jax.default_backend() == "gpu"
L2_BYTES = 50 << 20

MODELS = {   # hidden, kv heads, head dim, intermediate
    "llama-7b": dict(h=4096, nkv=32, hd=128, f=11008),
    "llama3-8b": dict(h=4096, nkv=8, hd=128, f=14336),
    # Stand-ins for --quick off the GPU, where the kernels run in the interpreter.
    "tiny-mha": dict(h=256, nkv=2, hd=64, f=512),
    "tiny-gqa": dict(h=256, nkv=1, hd=64, f=512),
}
QUICK_STANDIN = {"llama-7b": "tiny-mha", "llama3-8b": "tiny-gqa"}


# --- timing -----------------------------------------------------------------------

def measure(f, args, iters):
    """Median per-call time (us) and per-kernel medians {name: us}."""
    if ON_GPU:
        from jax.experimental.mosaic.gpu import profiler
        _, ts = profiler.measure(f, aggregate=False, iterations=iters)(*args)
        if iters == 1:
            ts = [ts]
        totals = [sum(ms for _, ms in it) for it in ts]
        kernels: dict[str, list[float]] = {}
        for it in ts:
            per: dict[str, float] = {}
            for name, ms in it:
                per[name] = per.get(name, 0.0) + ms
            for name, ms in per.items():
                kernels.setdefault(name, []).append(ms)
        return statistics.median(totals) * 1e3, {k: statistics.median(v) * 1e3
                                                 for k, v in kernels.items()}
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts), {}


def copy_bandwidth(iters):
    n = (256 << 20) if ON_GPU else (4 << 20)
    x = jnp.ones((n,), jnp.float32)
    us, _ = measure(jax.jit(lambda a: a * 1.0001), (x,), iters)
    return 2 * x.nbytes / (us * 1e-6) / 1e9


def repeats(bytes_per_call: int, cap: int = 8) -> int:
    """Independent batches per timed call so that their inputs overflow the L2."""
    if not ON_GPU:
        return 1
    return int(min(cap, max(1, -(-2 * L2_BYTES // max(bytes_per_call, 1)))))


# --- LoRA setup ---------------------------------------------------------------------

class AdapterPool:
    """`n` adapters of one layer in a random pool: for each, A^T/B of every q/k/v/o
    module at its rank, packed as `PoolLayout.adapter_offsets` packs them, on pages
    scattered by a random permutation."""

    def __init__(self, model, n, ranks, page_size, seed):
        m = MODELS[model]
        h, kv = m["h"], m["nkv"] * m["hd"]
        self.h, self.kv, self.page_size = h, kv, page_size
        self.shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h)}
        self.ranks = np.asarray(ranks, np.int32)
        offs, lens = [], []
        for r in self.ranks:
            row, off = 0, {}
            for mod, (fin, fout) in self.shapes.items():
                a = row
                row += -(-int(r) * fin // h)
                off[mod] = (a, row)
                row += -(-int(r) * fout // h)
            offs.append(off)
            lens.append(row)
        self.offsets = offs
        self.pages_per = -(-max(lens) // page_size)
        num_pages = n * self.pages_per + 1
        rng = np.random.default_rng(seed)
        self.pages = (rng.permutation(num_pages - 1) + 1).reshape(n, self.pages_per)
        key = jax.random.key(seed)
        self.rows = jax.random.normal(key, (num_pages * page_size, h), jnp.bfloat16)

    def batch(self, adapters, module, side):
        """Slot tables for the given adapters: pages, offset (A or B), rank, scale."""
        i = 0 if side == "a" else 1
        return (jnp.asarray(self.pages[adapters], jnp.int32),
                jnp.asarray([self.offsets[a][module][i] for a in adapters], jnp.int32),
                jnp.asarray(self.ranks[adapters], jnp.int32),
                jnp.full((len(adapters),), 0.5, jnp.float32))


def _standin(cfgs):
    """Off the GPU the kernels run in the interpreter: tiny models, tiny batches."""
    if ON_GPU:
        return cfgs
    small = dict(b=min, n=min, ctx=min)
    return [dict(c, model=QUICK_STANDIN[c["model"]],
                 **{k: small[k](c[k], 256 if k == "ctx" else 8) for k in small if k in c})
            for c in cfgs]


def lora_configs(quick, subset=None):
    if subset == "second":   # what a first full run ran out of time for
        return [dict(model="llama-7b", phase="decode", b=128, n=128, rank="mixed"),
                dict(model="llama-7b", phase="decode", b=512, n=512, rank="mixed"),
                dict(model="llama-7b", phase="decode", b=512, n=64, rank=8),
                dict(model="llama3-8b", phase="decode", b=256, n=256, rank="mixed")]
    if quick:
        return _standin([dict(model="llama-7b", phase="decode", b=128, n=128, rank=16),
                         dict(model="llama-7b", phase="decode", b=512, n=512, rank=64),
                         dict(model="llama-7b", phase="decode", b=512, n=512, rank="mixed"),
                         dict(model="llama3-8b", phase="decode", b=256, n=256, rank="mixed"),
                         dict(model="llama-7b", phase="prefill", b=2048, n=8, rank=16)])
    out = []
    for b in (1, 32, 128, 512):
        for r in (8, 64, "mixed") if b != 128 else (8, 16, 32, 64, "mixed"):
            out.append(dict(model="llama-7b", phase="decode", b=b, n=b, rank=r))
    for r in (8, "mixed"):
        out.append(dict(model="llama-7b", phase="decode", b=512, n=64, rank=r))
    for r in (16, "mixed"):
        out.append(dict(model="llama3-8b", phase="decode", b=256, n=256, rank=r))
    for b, n, r in ((2048, 8, 16), (4096, 32, "mixed")):
        out.append(dict(model="llama-7b", phase="prefill", b=b, n=n, rank=r))
    return out


# pallas: the whole call (plan + kernel); pallas-planned: with the plan computed outside,
# as XLA shares it between the modules and layers of a step; xla-gather: baseline (a).
BACKENDS_LORA = ("pallas", "pallas-planned", "xla-gather")


def _batched(one, backend):
    """One jitted call over independent batches (to overflow the L2)."""
    if backend == "pallas-planned":
        return jax.jit(lambda rows, bs, plans: [one(rows, *b, plan=p) for b, p in zip(bs, plans)])
    return jax.jit(lambda rows, bs, plans: [one(rows, *b) for b in bs])


def run_lora(cfg, pool, max_rank, args, copy_gbps, emit):
    rng = np.random.default_rng(hash(str(cfg)) % 2**32)
    t, n = cfg["b"], cfg["n"]
    gqa = MODELS[cfg["model"]]["nkv"] * MODELS[cfg["model"]]["hd"] < pool.h
    module = "o" if gqa else "q"        # o: its rows start unaligned under GQA
    h = pool.h
    batches, used = [], []
    probe = rng.choice(len(pool.ranks), n, replace=False)
    k = repeats(int(pool.ranks[probe].sum()) * h * 2 * 2)
    for _ in range(k):
        adapters = rng.choice(len(pool.ranks), n, replace=False)
        ts = rng.permutation(t) % n if cfg["phase"] == "decode" else \
            np.sort(rng.integers(0, n, t))
        x = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (t, h), jnp.bfloat16)
        batches.append((adapters, jnp.asarray(ts, jnp.int32), x))
        used.append(int(pool.ranks[adapters][np.unique(ts)].sum()))
    used = float(np.mean(used))        # rank rows of the distinct adapters a batch reads
    params = dict(cfg, module=module, max_rank=max_rank, repeats=k)
    ps = pool.page_size

    bt = lora_mgpu.pick_block_tokens(t, n)
    plans = jax.jit(lambda tss: [lora_mgpu.plan_batch(ts_, n, bt) for ts_ in tss])(
        [b[1] for b in batches])

    def shrink_fn(backend):
        def one(rows, pages, off, rank, ts, x, plan=None):
            if backend.startswith("pallas"):
                return lora_mgpu.lora_shrink(x, rows, pages, off, rank, ts, max_rank=max_rank,
                                             page_size=ps, plan=plan)
            return lora.lora_shrink_reference(x, rows, pages, off, rank, ts, max_rank=max_rank,
                                              page_size=ps)
        return _batched(one, backend)

    def expand_fn(backend, width):
        def one(rows, pages, off, rank, scale, ts, xa, plan=None):
            if backend.startswith("pallas"):
                return lora_mgpu.lora_expand(xa, rows, pages, off, rank, scale, ts,
                                             out_features=width, page_size=ps, plan=plan)
            return lora.lora_expand_reference(xa, rows, pages, off, rank, scale, ts,
                                              out_features=width, page_size=ps)
        return _batched(one, backend)

    sb = [(*pool.batch(a, module, "a")[:3], ts, x) for a, ts, x in batches]
    shrink_bytes = used * h * 2 + t * h * 2 + t * max_rank * 4
    for backend in BACKENDS_LORA:
        emit("lora_shrink", backend, params, shrink_fn(backend), (pool.rows, sb, plans), k,
             shrink_bytes, copy_gbps, args.iters)
    widths = [(module, pool.shapes[module][1])]
    if gqa:
        widths.append(("v", pool.kv))                    # k/v B: kv_size < H
    for mod, width in widths:
        xa = [jax.random.normal(jax.random.key(i), (t, max_rank), jnp.float32)
              for i in range(k)]
        eb = [(*pool.batch(a, mod, "b"), ts, xa[i]) for i, (a, ts, _) in enumerate(batches)]
        expand_bytes = used * width * 2 + t * max_rank * 4 + t * width * 4
        for backend in BACKENDS_LORA:
            emit("lora_expand", backend, dict(params, module=mod, width=width),
                 expand_fn(backend, width), (pool.rows, eb, plans), k, expand_bytes, copy_gbps,
                 args.iters)


def run_onehot(b, n_slots, rank, h, copy_gbps, emit, iters):
    """Baseline (b): vLLM-style stacked padded slots, selected by a one-hot einsum."""
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
    emit("lora_shrink+expand", "xla-onehot", dict(model="llama-7b", phase="decode", b=b,
                                                  n=n_slots, rank=rank, distinct=distinct),
         f, (a, bm, x, ts), 1, nbytes, copy_gbps, iters)


# --- attention ------------------------------------------------------------------------

def attn_configs(quick, subset=None):
    if subset == "second":
        return [dict(model=m, b=b, ctx=4096) for m in ("llama-7b", "llama3-8b")
                for b in (1, 16, 64)]
    if quick:
        return _standin([dict(model="llama-7b", b=16, ctx=4096),
                         dict(model="llama3-8b", b=64, ctx=4096)])
    out = []
    for model in ("llama-7b", "llama3-8b"):
        for b, ctx in ((1, 4096), (16, 1024), (16, 4096), (16, 8192), (64, 1024), (64, 4096)):
            out.append(dict(model=model, b=b, ctx=ctx))
    return out


def run_attention(cfg, copy_gbps, emit, iters, page_size):
    m = MODELS[cfg["model"]]
    h, nkv, hd = m["h"], m["nkv"], m["hd"]
    b, ctx = cfg["b"], cfg["ctx"]
    nq = h // hd
    kv_bytes = b * ctx * 2 * nkv * hd * 2
    k = repeats(kv_bytes, cap=4)
    tpp = page_size * h // (2 * nkv * hd)
    pk = -(-ctx // tpp)
    num_pages = k * b * pk + 1
    layout = PoolLayout(num_layers=1, num_pages=num_pages, page_size=page_size, row_width=h,
                        num_kv_heads=nkv, head_dim=hd, max_rank=8, module_shapes=())
    key = jax.random.key(ctx + b)
    layer = jax.random.normal(key, (num_pages, page_size, h), jnp.bfloat16)
    perm = np.random.default_rng(b).permutation(num_pages - 1) + 1
    tables = [jnp.asarray(perm[i * b * pk:(i + 1) * b * pk].reshape(b, pk), jnp.int32)
              for i in range(k)]
    lengths = jnp.full((b,), ctx, jnp.int32)
    q = jax.random.normal(key, (b, nq, hd), jnp.bfloat16)
    params = dict(cfg, nkv=nkv, g=nq // nkv, tokens_per_page=tpp, repeats=k)
    nbytes = kv_bytes + b * nq * hd * (2 + 4)

    def paged(backend):
        def one(layer, pages):
            if backend == "pallas":
                return paged_attention_mgpu.decode_attention(q, layer, pages, lengths, layout)
            return paged_attention.decode_attention_reference(q, layer, pages, lengths, layout)
        return jax.jit(lambda layer, ts: [one(layer, p) for p in ts])

    for backend in ("pallas", "xla-gather"):
        emit("decode_attention", backend, params, paged(backend), (layer, tables), k, nbytes,
             copy_gbps, iters)
    del layer
    # (d): XLA on contiguous caches, no paging.
    kc = [jax.random.normal(jax.random.key(i), (2, b, ctx, nkv, hd), jnp.bfloat16)
          for i in range(k)]

    def contig(caches):
        outs = []
        for c in caches:
            qg = q.reshape(b, nkv, nq // nkv, hd)
            s = jnp.einsum("bhgd,blhd->bhgl", qg, c[0], preferred_element_type=jnp.float32)
            p = jax.nn.softmax(s * hd ** -0.5, axis=-1)
            outs.append(jnp.einsum("bhgl,blhd->bhgd", p.astype(c.dtype), c[1],
                                   preferred_element_type=jnp.float32).reshape(b, nq, hd))
        return outs
    emit("decode_attention", "xla-contig", params, jax.jit(contig), (kc,), k, nbytes,
         copy_gbps, iters)


# --- driver ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="a few small configs")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per config (median)")
    ap.add_argument("--adapters", type=int, default=2000, help="adapters loaded in the pool")
    ap.add_argument("--only", choices=("lora", "attention"), help="one kernel family")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="stop starting new configs after this many seconds")
    ap.add_argument("--subset", choices=("second",), default=None,
                    help="'second': the configs a first full run left out (mixed ranks, "
                         "shared adapters, GQA, one-hot, attention)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends to time (default: all)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    t_start = time.time()
    dev = jax.devices()[0]
    device = getattr(dev, "device_kind", dev.platform)
    commit = os.environ.get("GIT_COMMIT") or _git_commit()
    copy_gbps = copy_bandwidth(args.iters)
    print(f"device={device} jax={jax.__version__} commit={commit} copy={copy_gbps:.0f} GB/s",
          flush=True)
    rows: list[dict] = []

    def emit(name, backend, params, f, fargs, reps, nbytes, copy, iters):
        if args.backends and backend not in args.backends.split(","):
            return
        row = dict(name=name, backend=backend, phase=params.get("phase", "decode"),
                   params=params, bytes=int(nbytes), copy_GBps=round(copy, 1))
        if time.time() - t_start > args.budget_s:
            row.update(skipped="time budget")
            rows.append(row)
            return
        try:
            us, kernels = measure(f, fargs, iters)
            per = us / reps
            row.update(median_us=round(per, 2), achieved_GBps=round(nbytes / per / 1e3, 1),
                       pct_copy=round(100 * nbytes / per / 1e3 / copy, 1),
                       kernels_us={kk: round(v / reps, 2) for kk, v in kernels.items()})
            mg = [v for kk, v in kernels.items() if kk.startswith("mgpu_")]
            if mg:
                row["kernel_us"] = round(sum(mg) / reps, 2)
        except Exception as e:   # a failed config is a result too; keep going
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        rows.append(row)
        print(_fmt_row(row), flush=True)

    page_size = 16
    if args.only in (None, "lora"):
        all_cfgs = lora_configs(args.quick, args.subset)
        for model in dict.fromkeys(c["model"] for c in all_cfgs):
            cfgs = [c for c in all_cfgs if c["model"] == model]
            if not cfgs:
                continue
            mixed = np.random.default_rng(1).choice([8, 16, 32, 64], args.adapters)
            n_ad = len(mixed)
            for rank in sorted({c["rank"] for c in cfgs}, key=str):
                ranks = mixed if rank == "mixed" else np.full(n_ad, rank)
                pool = AdapterPool(model, n_ad, ranks, page_size, seed=7)
                max_rank = 64 if rank == "mixed" else int(rank)
                for c in cfgs:
                    if c["rank"] == rank:
                        run_lora(c, pool, max_rank, args, copy_gbps, emit)
                del pool
        if not args.quick or args.subset:
            for n_slots in (8, 64, 1000):
                run_onehot(128, n_slots, 16, 4096, copy_gbps, emit, args.iters)
    if args.only in (None, "attention"):
        for c in attn_configs(args.quick, args.subset):
            run_attention(c, copy_gbps, emit, args.iters, page_size)

    _add_speedups(rows)
    _write(rows, args, device, commit, copy_gbps)
    _summary(rows, copy_gbps)


def _summary(rows, copy_gbps):
    """One line per op and config: each backend's time in us (and % of copy bandwidth)."""
    table: dict[tuple, dict] = {}
    for r in rows:
        p = r["params"]
        desc = " ".join(f"{k}={p[k]}" for k in ("model", "phase", "module", "width", "b", "n",
                                                 "rank", "ctx") if k in p)
        cell = (f"{r['median_us']:.1f}({r['pct_copy']:.0f}%)" if "median_us" in r
                else "err" if "error" in r else "skip")
        if "kernel_us" in r:
            cell += f"[k{r['kernel_us']:.1f}]"
        table.setdefault((r["name"], desc), {})[r["backend"]] = cell
    print(f"\nSUMMARY (us per call, % of copy {copy_gbps:.0f} GB/s, [k = Mosaic kernel alone])")
    for (name, desc), cells in table.items():
        print(f"{name[:12]:<12} {desc[:62]:<62} " + " ".join(f"{b}={c}" for b, c in cells.items()))


def _add_speedups(rows):
    base = {}
    for r in rows:
        if r.get("backend") in ("xla-gather", "xla-onehot") and "median_us" in r \
                and r["name"] != "lora_shrink+expand":
            base[(r["name"], json.dumps(r["params"], sort_keys=True))] = r["median_us"]
    for r in rows:
        ref = base.get((r["name"], json.dumps(r["params"], sort_keys=True)))
        if ref and "median_us" in r:
            r["speedup_vs_xla_gather"] = round(ref / r["median_us"], 2)


def _fmt_row(r):
    p = r["params"]
    desc = " ".join(f"{k}={p[k]}" for k in ("model", "module", "width", "b", "n", "rank", "ctx")
                    if k in p)
    if "error" in r:
        return f"{r['name']:<18} {r['backend']:<11} {desc}  ERROR {r['error']}"
    kern = f" kernel {r['kernel_us']:.1f}us" if "kernel_us" in r else ""
    return (f"{r['name']:<18} {r['backend']:<11} {desc:<58} {r['median_us']:>9.1f}us "
            f"{r['achieved_GBps']:>7.0f} GB/s ({r['pct_copy']:.0f}% copy){kern}")


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def _write(rows, args, device, commit, copy_gbps):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    tag = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    base = args.out or os.path.join(os.environ.get("BENCH_OUT", RESULTS),
                                    f"kernels_{tag}_{stamp}{'_quick' if args.quick else ''}")
    base = base[:-5] if base.endswith(".json") else base
    os.makedirs(os.path.dirname(base), exist_ok=True)
    meta = dict(device=device, jax=jax.__version__, commit=commit, copy_GBps=round(copy_gbps, 1),
                command="python benchmarks/kernels.py " + " ".join(sys.argv[1:]),
                timer="cupti" if ON_GPU else "wall", date=stamp)
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Kernel benchmark ({device})", "",
             f"JAX {meta['jax']}, commit `{commit}`, timer {meta['timer']}, copy bandwidth "
             f"{meta['copy_GBps']} GB/s (XLA, 1 GiB read + write), {stamp} UTC.", "",
             f"Command: `{meta['command']}`", "",
             "| op | backend | params | median us | kernel us | GB/s | % copy | vs xla-gather |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["params"]
        desc = ", ".join(f"{k}={p[k]}" for k in ("model", "phase", "module", "width", "b", "n",
                                                  "rank", "ctx") if k in p)
        if "median_us" not in r:
            lines.append(f"| {r['name']} | {r['backend']} | {desc} | "
                         f"{r.get('error', r.get('skipped', ''))} | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['backend']} | {desc} | {r['median_us']} | "
                     f"{r.get('kernel_us', '')} | {r['achieved_GBps']} | {r['pct_copy']} | "
                     f"{r.get('speedup_vs_xla_gather', '')} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
