"""Helpers of `benchmarks/kernels.py`: models, timing, the adapter pool, the config
groups, and the output (printed rows, summary, JSON and Markdown files).

What is timed, and how, lives in `kernels.py`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jcore  # noqa: E402

from slora_jax.config import MODULES  # noqa: E402
from slora_jax.pool import PoolLayout  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
L2_BYTES = 50 << 20
PAGE_SIZE = 16          # pool rows per page

MODELS = {   # hidden, kv heads, head dim, intermediate
    "llama-7b": dict(h=4096, nkv=32, hd=128, f=11008),
    "llama3-8b": dict(h=4096, nkv=8, hd=128, f=14336),
    # Stand-ins off the GPU, where the kernels run in the interpreter. F is not a multiple
    # of H and gcd(F, H) is a multiple of 64, as for 11008 (256) and 14336 (2048) at 4096.
    "tiny-mha": dict(h=256, nkv=4, hd=64, f=320),
    "tiny-gqa": dict(h=256, nkv=1, hd=64, f=384),
}
STANDIN = {"llama-7b": "tiny-mha", "llama3-8b": "tiny-gqa"}
# Ranks of a "mixed" pool. Off the GPU max rank 16: the interpreter's cost grows with it.
MIXED_RANKS = (8, 16, 32, 64) if ON_GPU else (8, 16)


def module_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA target module, as `ModelConfig.module_shape` gives them."""
    m = MODELS[model]
    h, kv, f = m["h"], m["nkv"] * m["hd"], m["f"]
    return dict(q=(h, h), k=(h, kv), v=(h, kv), o=(h, h), gate=(h, f), up=(h, f), down=(f, h))


def randn(key, shape, dtype=jnp.bfloat16, block=1 << 26):
    """Random normal data; past `block` elements, a random block of rows repeated (values
    do not matter for timing, and a 20 GB pool must not need 40 GB of random bits)."""
    n, last = int(np.prod(shape)), shape[-1]
    if n <= block:
        return jax.random.normal(key, shape, dtype)
    brows = max(1, block // last)

    @jax.jit
    def make():
        base = jax.random.normal(key, (brows, last), dtype)
        return base[jnp.arange(n // last, dtype=jnp.int32) % brows].reshape(shape)
    return make()


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
    """GB/s of an XLA elementwise copy (1 GiB on the GPU), read + write."""
    n = (256 << 20) if ON_GPU else (4 << 20)
    x = jnp.ones((n,), jnp.float32)
    us, _ = measure(jax.jit(lambda a: a * 1.0001), (x,), iters)
    return 2 * x.nbytes / (us * 1e-6) / 1e9


def matmul_rate(iters):
    """TFLOP/s of a dense bf16 matmul (8192^3 on the GPU)."""
    n = 8192 if ON_GPU else 512
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    us, _ = measure(jax.jit(lambda a, b: a @ b), (a, b), min(iters, 10))
    return 2 * n ** 3 / (us * 1e-6) / 1e12


def repeats(bytes_per_call: int, cap: int = 8) -> int:
    """Independent batches per timed call so that their inputs overflow the L2."""
    if not ON_GPU:
        return 1
    return int(min(cap, max(1, -(-2 * L2_BYTES // max(bytes_per_call, 1)))))


# Primitives that mean "a Pallas kernel runs here": pallas_call on the GPU; the Mosaic GPU
# interpreter (off the GPU) discharges the kernel into these at trace time.
_KERNEL_PRIMS = {"pallas_call", "core_map", "mpmd_map", "copy_gmem_to_smem", "wgmma_ref"}


def error_text(e: BaseException) -> str:
    """A row's `error`: the exception's class and the first line of its message."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:300] if msg else ''}"


def uses_kernel(f, args) -> bool:
    """Whether `f(*args)` runs a Pallas kernel (False: a dispatch fell back to XLA)."""
    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in _KERNEL_PRIMS:
                return True
            for v in e.params.values():
                for s in v if isinstance(v, (list, tuple)) else (v,):
                    sub = s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s
                    if isinstance(sub, jcore.Jaxpr) and walk(sub):
                        return True
        return False
    return walk(jax.make_jaxpr(f)(*args).jaxpr)


# --- the adapter pool ---------------------------------------------------------------

class AdapterPool:
    """`n` adapters of one layer in a random pool. Each adapter targets all seven modules
    at its rank; its rows are laid out by `PoolLayout.adapter_offsets` (only that
    method's contract is used: per module the (A^T, B) row offsets in the adapter's row
    stream, and the stream length), on its own pages, scattered by a random permutation.
    Pool contents are random (not packed weights): the kernels' time does not depend on
    them."""

    def __init__(self, model, ranks, page_size, seed):
        m = MODELS[model]
        shapes = module_shapes(model)
        self.h, self.page_size = m["h"], page_size
        self.shapes = shapes
        self.ranks = np.asarray(ranks, np.int32)
        self.max_rank = int(self.ranks.max())
        self.layout = PoolLayout(
            num_layers=1, num_pages=1, page_size=page_size, row_width=m["h"],
            num_kv_heads=m["nkv"], head_dim=m["hd"], max_rank=self.max_rank,
            module_shapes=tuple(shapes[mod] for mod in MODULES))
        per_rank = {int(r): self.layout.adapter_offsets({mod: int(r) for mod in MODULES})
                    for r in np.unique(self.ranks)}
        self.offsets = np.stack([per_rank[int(r)][0] for r in self.ranks])   # [n, M, 2]
        n_pages = np.array([-(-per_rank[int(r)][1] // page_size) for r in self.ranks])
        self.pages_per = int(n_pages.max())
        total = int(n_pages.sum()) + 1                      # page 0: the null page
        rng = np.random.default_rng(seed)
        perm = rng.permutation(total - 1) + 1
        self.pages = np.zeros((len(self.ranks), self.pages_per), np.int32)   # 0-padded
        ends = np.cumsum(n_pages)
        for i, (s, e) in enumerate(zip(ends - n_pages, ends)):
            self.pages[i, :e - s] = perm[s:e]
        self.rows = randn(jax.random.key(seed), (total * page_size, self.h))

    def __len__(self):
        return len(self.ranks)

    def slots(self, adapters, module, side):
        """Slot tables of a batch's adapters: pages, row offset (A^T or B), rank."""
        mi, j = MODULES.index(module), 0 if side == "a" else 1
        return (jnp.asarray(self.pages[adapters], jnp.int32),
                jnp.asarray(self.offsets[adapters, mi, j], jnp.int32),
                jnp.asarray(self.ranks[adapters], jnp.int32))


# --- configs --------------------------------------------------------------------------
#
# Groups run in this order; each has a share of the time budget (see kernels.py). The
# configs inside a group are in priority order. Tier "a" groups run first, then tier "b"
# with what is left.

ATTN_OPS = {False: (("shrink", "q"), ("expand", "q")),                      # MHA
            True: (("shrink", "o"), ("expand", "o"), ("expand", "v"))}     # GQA: kv < H
MLP_OPS = (("shrink", "gate"), ("expand", "gate"), ("shrink", "down"), ("expand", "down"))
# Prefill segments (one adapter each), tokens per prompt.
SEGMENTS = {512: (256, 256), 2048: (512, 256, 1024, 256),
            8192: (2048, 1024, 256, 2048, 512, 1536, 768)}


def _decode(model, b, n, rank, ops=None, **kw):
    gqa = MODELS[model]["nkv"] * MODELS[model]["hd"] < MODELS[model]["h"]
    return dict(model=model, phase="decode", b=b, n=n, rank=rank,
                ops=ops or ATTN_OPS[gqa], **kw)


def _prefill(t, rank):
    return dict(model="llama-7b", phase="prefill", b=t, n=len(SEGMENTS[t]), rank=rank,
                segs=SEGMENTS[t], ops=ATTN_OPS[False])


def groups(quick: bool) -> list[dict]:
    """The benchmark's config groups: family (for --only), label, tier, share, configs."""
    if quick:
        g = [("lora", "lora-decode", "a", [_decode("llama-7b", 8, 8, 16),
                                           _decode("llama3-8b", 8, 8, "mixed")]),
             ("lora", "lora-mlp", "a", [_decode("llama-7b", 8, 8, 16, ops=MLP_OPS)]),
             ("lora-prefill", "lora-prefill", "a", [_prefill(512, 16)]),
             ("attention", "attention", "a", [dict(model="llama-7b", b=8, ctx=256),
                                              dict(model="llama3-8b", b=8, ctx=256)]),
             ("prefill-attention", "prefill-attention", "a",
              [dict(model="llama-7b", nseq=2, s=64)]),
             ("lora", "lora-onehot", "b", [dict(b=8, n_slots=8, rank=16, h=256)])]
    else:
        decode = [_decode("llama-7b", 128, 128, 16), _decode("llama-7b", 128, 128, "mixed"),
                  _decode("llama3-8b", 256, 256, "mixed"), _decode("llama-7b", 512, 512, "mixed")]
        mlp = [_decode("llama-7b", 128, 128, "mixed", ops=MLP_OPS),
               _decode("llama3-8b", 256, 256, 16, ops=MLP_OPS)]
        prefill = [_prefill(2048, 16), _prefill(8192, 16), _prefill(2048, "mixed"),
                   _prefill(8192, "mixed"), _prefill(512, 16)]
        attn = [dict(model=m, b=b, ctx=ctx)
                for ctx, b in ((4096, 64), (4096, 16), (8192, 16), (4096, 1), (8192, 64), (8192, 1))
                for m in ("llama-7b", "llama3-8b")]
        pattn = [dict(model=m, nseq=nseq, s=s) for nseq, s in ((4, 512), (1, 8192), (4, 2048))
                 for m in ("llama-7b", "llama3-8b")]
        # Tier b: what is left of the budget after tier a.
        decode_more = [_decode("llama-7b", 128, 128, 64), _decode("llama-7b", 512, 512, 64),
                       _decode("llama3-8b", 256, 256, 16), _decode("llama-7b", 512, 64, 8),
                       _decode("llama-7b", 32, 32, "mixed"), _decode("llama-7b", 1, 1, 16)]
        mlp_more = [_decode("llama-7b", 256, 256, 16, ops=MLP_OPS),
                    _decode("llama3-8b", 128, 128, "mixed", ops=MLP_OPS)]
        attn_more = [dict(model=m, b=b, ctx=ctx) for ctx, b in ((16384, 16), (16384, 1),
                                                               (1024, 64), (1024, 16), (1024, 1))
                     for m in ("llama-7b", "llama3-8b")]
        onehot = [dict(b=128, n_slots=s, rank=16, h=4096) for s in (8, 64, 1000)]
        g = [("lora", "lora-decode", "a", decode), ("lora", "lora-mlp", "a", mlp),
             ("lora-prefill", "lora-prefill", "a", prefill), ("attention", "attention", "a", attn),
             ("prefill-attention", "prefill-attention", "a", pattn),
             ("attention", "attention-more", "b", attn_more),
             ("lora", "lora-decode-more", "b", decode_more),
             ("lora", "lora-mlp-more", "b", mlp_more),
             ("lora-prefill", "lora-prefill-more", "b", [_prefill(512, "mixed")]),
             ("lora", "lora-onehot", "b", onehot)]
    shares = {"lora-decode": 0.22, "lora-mlp": 0.16, "lora-prefill": 0.22, "attention": 0.22,
              "prefill-attention": 0.18}
    return [dict(family=f, label=lab, tier=t, share=shares.get(lab, 0.0),
                 configs=standin(cfgs)) for f, lab, t, cfgs in g]


def standin(cfgs):
    """Off the GPU the kernels run in the interpreter: tiny models, tiny batches."""
    if ON_GPU:
        return cfgs
    out = []
    for c in cfgs:
        c = dict(c)
        if "model" in c:
            c["model"] = STANDIN.get(c["model"], c["model"])
        if c.get("phase") == "decode":
            c.update(b=min(c["b"], 8), n=min(c["n"], 8))
        if c.get("phase") == "prefill":
            c.update(b=64, n=2, segs=(32, 32))
        if "ctx" in c:
            c.update(b=min(c["b"], 8), ctx=min(c["ctx"], 128))
        if "nseq" in c:
            c.update(nseq=min(c["nseq"], 2), s=min(c["s"], 64))
        if "n_slots" in c:
            c.update(b=min(c["b"], 8), n_slots=min(c["n_slots"], 8), h=256)
        if c not in out:
            out.append(c)
    return out


# --- output ---------------------------------------------------------------------------------

DESC_KEYS = ("model", "phase", "module", "width", "b", "n", "rank", "ctx", "nseq", "s")


def desc(p, sep=" "):
    return sep.join(f"{k}={p[k]}" for k in DESC_KEYS if k in p)


def _key(r):
    p = {k: v for k, v in r["params"].items()
         if k not in ("k_splits", "ppcb", "blocks", "block_tokens", "sorted")}
    return r["name"], json.dumps(p, sort_keys=True)


def add_ratios(rows):
    """speedup_vs_xla_gather (decode/prefill LoRA and decode attention) and vs_dense
    (prefill LoRA: dense time / this time; the target is >= 0.67, i.e. within 1.5x)."""
    base: dict[str, dict] = {"xla-gather": {}, "dense": {}}
    for r in rows:
        if r.get("backend") in base and "median_us" in r:
            base[r["backend"]][_key(r)] = r["median_us"]
    for r in rows:
        if "median_us" not in r:
            continue
        for b, field in (("xla-gather", "speedup_vs_xla_gather"), ("dense", "vs_dense")):
            ref = base[b].get(_key(r))
            if ref:
                r[field] = round(ref / r["median_us"], 2)


def _cell(r):
    if "median_us" not in r:
        return "err" if "error" in r else "skip"
    c = f"{r['median_us']:.1f}"
    c += f"({r['tflops']:.3g}TF)" if "tflops" in r else f"({r['pct_copy']:.0f}%)"
    if "kernel_us" in r:
        c += f"[k{r['kernel_us']:.1f}]"
    return c + ("*" if r.get("fallback") else "")


def summary(rows, copy_gbps, mm):
    """One line per op and config: each backend's time in us."""
    table: dict[tuple, dict] = {}
    for r in rows:
        if r["backend"] != "*":
            table.setdefault((r["name"], _short(r["params"])), {})[r["backend"]] = _cell(r)
    print(f"\nSUMMARY (us per call; (% of copy {copy_gbps:.0f} GB/s) or (TFLOP/s, matmul "
          f"{mm:.3g}); [k = Mosaic kernel alone]; * = fell back to the reference)")
    for (name, d), cells in table.items():
        print(f"{name[:17]:<17} {d:<40} " + " ".join(f"{b}={c}" for b, c in cells.items()))


def _short(p):
    """model phase module wWIDTH bB nN rRANK / ctx / prompts: the summary's config column."""
    parts = [p.get("model", ""), p.get("phase", "")[:3], p.get("module", "")]
    for k, tag in (("width", "w"), ("b", "b"), ("n", "n"), ("rank", "r"), ("ctx", "ctx"),
                   ("nseq", "x"), ("s", "s")):
        if k in p:
            parts.append(f"{tag}{p[k]}")
    return " ".join(x for x in parts if x)


def fmt_row(r):
    head = f"{r['name']:<18} {r['backend']:<14} {desc(r['params']):<60}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    extra = f" kernel {r['kernel_us']:.1f}us" if "kernel_us" in r else ""
    extra += f" {r['tflops']:.1f} TFLOP/s" if "tflops" in r else ""
    extra += " (fallback: reference)" if r.get("fallback") else ""
    return (f"{head} {r['median_us']:>9.1f}us {r['achieved_GBps']:>7.0f} GB/s "
            f"({r['pct_copy']:.0f}% copy){extra}")


def git_commit():
    if os.environ.get("SLORA_COMMIT"):        # the device copy's .git may be stale
        return os.environ["SLORA_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        c = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                    stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                        cwd=here, stderr=subprocess.DEVNULL).decode().strip()
        return c + ("+uncommitted" if dirty else "")
    except Exception:
        return "unknown"


def result_stem(benchmark: str, commit: str) -> str:
    """`<benchmark>_<device>_<commit>`: the name a result set is kept under in results/
    (device `h100`, `h200`, `cpu`; the short commit, `-uncommitted` if the tree had edits),
    so a rerun at the same commit replaces its files and one set per benchmark remains."""
    kind = jax.devices()[0].device_kind.lower()
    m = re.search(r"\b[a-z]{1,2}\d{2,4}[a-z]?\b", kind)
    device = m.group(0) if m else re.sub(r"[^a-z0-9]+", "-", kind).strip("-")
    short = commit.split("+")[0][:7] + ("-uncommitted" if "+" in commit else "")
    return f"{benchmark}_{device}_{short}"


def write_results(rows, args, device, commit, copy_gbps, mm):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "_".join(["kernels", *sorted(args.only.split(",") if args.only else []),
                     *(["quick"] if args.quick else [])])
    stem = result_stem(name, commit)
    base = args.out or os.path.join(os.environ.get("BENCH_OUT", RESULTS), stem)
    if os.path.isdir(base) or base.endswith("/"):      # --out DIR: the default name inside
        base = os.path.join(base, stem)
    base = base[:-5] if base.endswith(".json") else base
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    meta = dict(device=device, jax=jax.__version__, commit=commit, copy_GBps=round(copy_gbps, 1),
                matmul_tflops=round(mm, 1),
                command="python benchmarks/kernels.py " + " ".join(sys.argv[1:]),
                timer="cupti" if ON_GPU else "wall", date=stamp, budget_s=args.budget_s,
                iters=args.iters)
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Kernel benchmark ({device})", "",
             f"JAX {meta['jax']}, commit `{commit}`, timer {meta['timer']}, copy bandwidth "
             f"{meta['copy_GBps']} GB/s (XLA copy{', 1 GiB' if ON_GPU else ''}, read + "
             f"write), dense bf16 matmul{' 8192^3' if ON_GPU else ''} "
             f"{meta['matmul_tflops']} TFLOP/s, {stamp} UTC.", "",
             f"Command: `{meta['command']}`", "",
             "| op | backend | params | median us | kernel us | GB/s | % copy | TFLOP/s | "
             "% matmul | vs xla-gather | vs dense | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        d = desc(r["params"], ", ")
        note = r.get("error") or (f"skipped: {r['skipped']}" if "skipped" in r else "")
        if r.get("fallback"):
            note = ("fallback to the reference; " + note).strip("; ")
        note = note.replace("|", "/")
        if "median_us" not in r:
            lines.append(f"| {r['name']} | {r['backend']} | {d} | | | | | | | | | {note} |")
            continue
        lines.append(
            f"| {r['name']} | {r['backend']} | {d} | {r['median_us']} | "
            f"{r.get('kernel_us', '')} | {r['achieved_GBps']} | {r['pct_copy']} | "
            f"{r.get('tflops', '')} | {r.get('pct_matmul', '')} | "
            f"{r.get('speedup_vs_xla_gather', '')} | {r.get('vs_dense', '')} | {note} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.json and {base}.md")


def write_sweep(out_dir, tag, rows, lines, copy_gbps, show=True):
    """A tuning sweep's results: `{tag}_{platform}.json` (device, JAX, commit, command and
    every row) and `.md` (the table `lines`), both under out_dir; prints the table if
    `show`."""
    os.makedirs(out_dir, exist_ok=True)
    tag = f"{tag}_{jax.devices()[0].platform}"
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=git_commit(),
                command=" ".join(sys.argv), copy_GBps=copy_gbps)
    with open(os.path.join(out_dir, tag + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, tag + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))
