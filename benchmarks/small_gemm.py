"""The base model's weight matmuls at a few rows: as the decode step writes them
(float32 output, rounded after the LoRA term is added: `model._mm`, the step's form
before session 10; bf16 output: `model.proj`, its form since) against the plain XLA
step's `h @ w`, each behind its RMS norm, with and without a float32 LoRA term added,
timed with CUPTI.

At B=1 the e2e LoRA-off step's weight GEMMs took ~1000 us/step more than the plain-XLA
step's (benchmarks/NOTES_kernels.md, session 10); this isolates the GEMM form.

    python benchmarks/small_gemm.py --rows 1,2,4,8 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.kernels_setup import copy_bandwidth, git_commit, measure, randn  # noqa: E402
from slora_jax.model import _mm, proj, rms_norm  # noqa: E402

SHAPES = {"qkvo": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}


def forms():
    def xla(x, nw, w):
        return rms_norm(x, nw, 1e-5) @ w

    def step(x, nw, w):
        return (_mm(rms_norm(x, nw, 1e-5), w) + 0.0).astype(x.dtype)

    def step_bf16(x, nw, w):          # the step's form since session 10
        return proj(rms_norm(x, nw, 1e-5), w)

    def lora_f32(x, nw, w, d):        # with a float32 LoRA term added before rounding
        return (_mm(rms_norm(x, nw, 1e-5), w) + d).astype(x.dtype)

    def lora_bf16(x, nw, w, d):
        return (proj(rms_norm(x, nw, 1e-5), w) + d).astype(x.dtype)

    return {"xla": xla, "step-f32": step, "step-bf16": step_bf16, "lora-f32": lora_f32,
            "lora-bf16": lora_bf16}


def gemm_configs(f, args) -> list[str]:
    """The tiling XLA gave the compiled function's GEMM fusions (output tile, warps)."""
    text = jax.jit(f).lower(*args).compile().as_text()
    return sorted(set(re.findall(r'"num_warps":"\d+","output_tiles":\[\{"sizes":\[[^]]*\]', text))
                  | set(re.findall(r'custom_call_target="__cublas\w*"', text)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    copy = copy_bandwidth(20)
    rows, lines = [], []
    for name, (k, n) in SHAPES.items():
        w = randn(jax.random.key(k + n), (k, n))
        nw = jnp.ones((k,), jnp.bfloat16)
        for m in map(int, args.rows.split(",")):
            x = randn(jax.random.key(m), (m, k))
            cells = []
            d = randn(jax.random.key(m + 1), (m, n), jnp.float32)
            for form, f in forms().items():
                fa = (x, nw, w, d) if form.startswith("lora") else (x, nw, w)
                us, _ = measure(jax.jit(f), fa, args.iters)
                cfg = gemm_configs(f, fa)
                gbps = w.nbytes / (us * 1e-6) / 1e9
                rows.append(dict(shape=name, k=k, n=n, m=m, form=form, median_us=us,
                                 achieved_GBps=gbps, copy_GBps=copy, gemm_configs=cfg))
                cells.append(f"{form} {us:7.1f} ({100 * gbps / copy:3.0f}%)")
                print(f"  {name} m={m} {form}: {cfg}", flush=True)
            lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    head = [f"# weight GEMMs at a few rows ({jax.devices()[0].device_kind}, JAX {jax.__version__}, "
            f"commit {git_commit()})", "", f"copy {copy:.0f} GB/s; us (% of copy over the "
            "weight's bytes)", "", "| shape | rows | " + " | ".join(forms()) + " |",
            "|---|---|" + "---|" * len(forms())]
    print("\n".join(head + lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "small_gemm.json"), "w") as fh:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           commit=git_commit(), command=" ".join(sys.argv), rows=rows), fh,
                      indent=1)
        with open(os.path.join(args.out, "small_gemm.md"), "w") as fh:
            fh.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
