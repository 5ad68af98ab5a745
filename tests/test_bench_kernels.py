"""Smoke tests of the kernel benchmark (`benchmarks/kernels.py`) on the CPU."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.config import MODULES

_HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load("kernels")
setup = _load("kernels_setup")


def test_pool_pages_hold_every_matrix():
    """Each adapter's matrices (at the offsets of PoolLayout.adapter_offsets) lie inside its
    own pages, and no page belongs to two adapters."""
    ranks = np.array([8, 16, 8, 16, 16])
    pool = setup.AdapterPool("tiny-mha", ranks, setup.PAGE_SIZE, seed=3)
    seen = set()
    for i, r in enumerate(ranks):
        pages = pool.pages[i][pool.pages[i] > 0]
        assert not seen & set(pages.tolist())
        seen |= set(pages.tolist())
        _, length = pool.layout.adapter_offsets({m: int(r) for m in MODULES})
        assert len(pages) * setup.PAGE_SIZE >= length
        assert pool.offsets[i].max() < length
    assert pool.rows.shape[0] >= (max(seen) + 1) * setup.PAGE_SIZE


@pytest.mark.slow
def test_pallas_rows_compute_what_the_reference_rows_compute():
    """The benchmark's Pallas and reference calls agree for every kind of module (q, k/v
    width, the MLP's F on either side), so both get the same max_rank/out_features."""
    ranks = np.array([8, 16, 16, 8])
    pool = setup.AdapterPool("tiny-gqa", ranks, setup.PAGE_SIZE, seed=5)
    t, n = 8, 4
    ts = jnp.asarray(np.arange(t) % n, jnp.int32)
    adapters = np.arange(n)
    xa = jax.random.normal(jax.random.key(0), (t, pool.max_rank), jnp.float32)
    scale = jnp.full((n,), 0.5, jnp.float32)
    for op, mod in (("shrink", "o"), ("expand", "v"), ("expand", "gate"), ("shrink", "down")):
        w_in, w_out = pool.shapes[mod]
        width = w_in if op == "shrink" else w_out
        act = setup.randn(jax.random.key(1), (t, w_in)) if op == "shrink" else xa
        bs = [(act, *pool.slots(adapters, mod, "a" if op == "shrink" else "b"), scale, ts)]
        plan = bench._module_plan(op, pool.rows, *bs[0], n=n, max_rank=pool.max_rank,
                                  width=width, ps=pool.page_size, prefill=False, grouped=False)
        # the unplanned call (its plan built inside) once: it wraps the same kernels
        backends = ("pallas-planned", "xla-gather") + (("pallas",) if mod == "o" else ())
        outs = {b: bench._lora_fn(op, b, pool.max_rank, width, pool.page_size)(
            pool.rows, bs, [plan if b == "pallas-planned" else None])[0] for b in backends}
        if "pallas" in outs:
            np.testing.assert_allclose(outs["pallas"], outs["pallas-planned"], rtol=1e-5,
                                       atol=1e-5)
        assert outs["xla-gather"].shape == (t, pool.max_rank if op == "shrink" else width)
        np.testing.assert_allclose(outs["pallas-planned"], outs["xla-gather"], rtol=2e-2,
                                   atol=2e-2 * float(jnp.abs(outs["xla-gather"]).max()))


def test_baseline_rows(tmp_path):
    """The XLA-only rows of the prefill families: fields, FLOPs, ratios, the Markdown."""
    out = tmp_path / "k.json"
    bench.main(["--quick", "--only", "lora-prefill,prefill-attention",
                "--backends", "xla-gather,dense,ragged-dot,xla-ref", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {"device", "jax", "commit", "command", "copy_GBps", "matmul_tflops"} <= set(data["meta"])
    assert {r["backend"] for r in rows} == {"xla-gather", "dense", "ragged-dot", "xla-ref"}
    for r in rows:
        assert {"name", "backend", "phase", "params", "median_us", "bytes", "achieved_GBps",
                "copy_GBps", "tflops", "matmul_tflops", "flops"} <= set(r), r
        assert r["phase"] == "prefill"
    dense = [r for r in rows if r["backend"] == "dense"]
    assert {r["name"] for r in dense} == {"lora_shrink", "lora_expand", "lora_apply"}
    assert all(r["vs_dense"] == 1.0 for r in dense)
    assert all("vs_dense" in r for r in rows if r["name"].startswith("lora"))
    md = out.with_suffix(".md").read_text()
    assert "| op | backend |" in md and "ragged-dot" in md and "xla-ref" in md


@pytest.mark.slow
def test_quick_run_covers_every_family(tmp_path):
    out = tmp_path / "k.json"
    bench.main(["--quick", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r or r.get("skipped") == "time budget"]
    names = {r["name"] for r in rows}
    assert {"lora_shrink", "lora_expand", "lora_shrink+expand", "decode_attention",
            "prefill_attention"} <= names
    modules = {r["params"].get("module") for r in rows}
    assert {"q", "o", "v", "gate", "down"} <= modules
    assert {r["phase"] for r in rows if r["name"] == "lora_shrink"} == {"decode", "prefill"}


@pytest.mark.slow
def test_tune_lora_quick(tmp_path):
    """The decode LoRA work-split sweep runs end to end (interpreted), writes its JSON and
    table, and every shrink/expand configuration it times computes what the default does."""
    tune = _load("tune_lora")
    tune.main(["--quick", "--out", str(tmp_path)])
    out = json.load(open(tmp_path / f"tune_lora_{jax.default_backend()}.json"))
    rows = out["rows"]
    assert {"device", "jax", "commit", "command", "copy_GBps"} <= set(out["meta"])
    for kind in ("shrink", "expand"):
        ks = [r for r in rows if r["kind"] == kind]
        assert ks[0]["config"] == "default" and len(ks) >= 3
        for r in ks:
            assert r["kernel_us"] > 0 and r["rel_diff_vs_default"] <= 2 ** -7, r
    assert any(r["kind"] == "apply" for r in rows)
    assert (tmp_path / f"tune_lora_{jax.default_backend()}.md").exists()


def test_tune_lora_apply_sweep(tmp_path):
    """--apply-sweep: under each TuningConfig.shrink_blocks the apply computes what the
    jnp reference computes (to the bf16 rounding of x·A), and one target block means
    one K split."""
    tune = _load("tune_lora")
    tune.main(["--apply-sweep", "--shapes", "tiny-mha:qkv:4:2:mixed", "--iters", "1",
               "--shrink-blocks", "132,1", "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / f"tune_lora_apply_{jax.default_backend()}.json"))["rows"]
    assert [r["kind"] for r in rows] == ["xla"] + ["apply"] * 2
    for r in rows[1:]:
        assert r["rel_diff_vs_xla"] < 2e-2, r
    splits = {r["config"]["shrink_blocks"]: r["splits"] for r in rows[1:]}
    assert splits[1] == 1 and splits[132] >= 1, splits
