"""The engine against HF Transformers + PEFT on real HF/PEFT files.

Fixtures (tests/fixtures/tiny_mha, tiny_gqa; made by tests/oracle/make_fixtures.py):
a random MHA model and a GQA model with odd sizes and llama3 rope scaling,
five PEFT adapters each (ranks 1..16, attention-only, MLP-only, rsLoRA on
all-linear), ~10 requests mixing adapters and base-only. All requests run in
ONE batch through `prefill` and then `decode` for 24 greedy steps.

Tolerance: float32 on both sides; XLA vs torch summation order differs, so
logits agree to 1e-4 relative to the logits' scale (measured 1.6e-6 prefill,
2.1e-6 decode, 2026-11-22); greedy
tokens must be identical (the fixtures' minimum top-1/top-2 margin is 1.6e-2;
tiny_gqa's llama3 rope scaling puts one frequency in each of its three bands).
The live variant reruns HF + PEFT now when they are available.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.adapters import load_peft_adapter
from slora_jax.batching import Sampling, decode_batch, prefill_batch
from slora_jax.config import EngineConfig, load_model_config
from slora_jax.params import load_hf_params
from slora_jax.step import decode, prefill
from serving.offline import OfflineEngine

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "fixtures")
MODELS = ["tiny_mha", "tiny_gqa"]
REL_TOL = 1e-4


def load_fixture(name):
    root = os.path.join(FIXTURES, name)
    with open(os.path.join(root, "requests.json")) as f:
        reqs = json.load(f)
    oracle = np.load(os.path.join(root, "oracle.npz"))
    with open(os.path.join(root, "oracle_meta.json")) as f:
        meta = json.load(f)
    return root, reqs, oracle, meta


def run_engine(root, reqs, n_decode):
    """All requests in one batch: prefill logits [T, V] per request, then greedy decode."""
    model_dir = os.path.join(root, "model")
    mc = load_model_config(model_dir)
    params = load_hf_params(model_dir, mc, jnp.float32)
    ec = EngineConfig(page_size=4, num_pages=512, max_rank=16, max_batch=16,
                      max_prefill_tokens=256, max_prefill_requests=16, max_context=64,
                      max_adapters_per_batch=8)
    eng = OfflineEngine(params, mc, ec, jnp.float32)
    adir = os.path.join(root, "adapters")
    for name in sorted(os.listdir(adir)):
        eng.add_adapter(load_peft_adapter(os.path.join(adir, name), mc))
    names = sorted({r["adapter"] for r in reqs if r["adapter"]})
    slots = [eng._make_resident(n) for n in names]
    req_slot = [names.index(r["adapter"]) if r["adapter"] else -1 for r in reqs]
    lay = eng.layout
    kv = [eng.allocator.alloc(("kv", i), lay.kv_pages_for(ec.max_context), "kv")
          for i in range(len(reqs))]
    prompts = [r["prompt_token_ids"] for r in reqs]
    samp = [Sampling()] * len(reqs)
    b = prefill_batch(prompts, kv, req_slot, samp, slots, ec, lay)
    eng.pool, out = prefill(params, eng.pool, b, spec=eng.spec.with_(logits="all"))
    all_logits = np.asarray(out.logits)
    offs = np.cumsum([0] + [len(p) for p in prompts])
    prefill_logits = [all_logits[offs[i]:offs[i + 1]] for i in range(len(reqs))]
    tokens = [[int(t)] for t in np.asarray(out.tokens)[:len(reqs)]]
    step_logits = [[pl[-1]] for pl in prefill_logits]
    spec = eng.spec.with_(logits="last")
    for s in range(n_decode - 1):
        pos = [len(p) + s for p in prompts]
        d = decode_batch([t[-1] for t in tokens], pos, kv, req_slot, samp, slots, ec, lay)
        eng.pool, o = decode(params, eng.pool, d, spec=spec)
        lg, tk = np.asarray(o.logits), np.asarray(o.tokens)
        for i in range(len(reqs)):
            tokens[i].append(int(tk[i]))
            step_logits[i].append(lg[i])
    return prefill_logits, tokens, [np.stack(s) for s in step_logits]


def compare(reqs, oracle_out, engine_out):
    prefill_logits, tokens, step_logits = engine_out
    for i, r in enumerate(reqs):
        rid = r["id"]
        ref_pf = oracle_out[f"{rid}/prefill_logits"]
        scale = np.abs(ref_pf).max()
        err = np.abs(prefill_logits[i] - ref_pf).max() / scale
        assert err < REL_TOL, f"{rid} ({r['adapter']}): prefill logits rel err {err:.2e}"
        ref_tok = [int(t) for t in oracle_out[f"{rid}/greedy_tokens"]]
        assert tokens[i] == ref_tok, f"{rid} ({r['adapter']}): greedy tokens differ"
        ref_dl = oracle_out[f"{rid}/decode_logits"]
        err = np.abs(step_logits[i] - ref_dl).max() / np.abs(ref_dl).max()
        assert err < REL_TOL, f"{rid} ({r['adapter']}): decode logits rel err {err:.2e}"


@pytest.mark.parametrize("model", MODELS)
def test_matches_hf_peft_fixtures(model):
    root, reqs, oracle, meta = load_fixture(model)
    assert meta["n_decode"] >= 20
    assert {r["adapter"] for r in reqs} >= {None, "r2_qv", "r8_attn", "r4_mlp",
                                             "r16_rslora_all", "r1_o_down"}
    compare(reqs, oracle, run_engine(root, reqs, meta["n_decode"]))


def _live_oracle_python():
    """A Python with torch + transformers + peft: this one, or .venv-oracle's."""
    try:
        import peft, torch, transformers  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    cand = os.environ.get("SLORA_ORACLE_PYTHON") or os.path.join(HERE, "..", ".venv-oracle", "bin", "python")
    return cand if os.path.isfile(cand) else None


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_matches_hf_peft_live(model, tmp_path):
    """Rerun HF + PEFT now on the committed folders and compare to the engine."""
    py = _live_oracle_python()
    if py is None:
        pytest.skip("no Python with torch, transformers and peft (set SLORA_ORACLE_PYTHON)")
    root, reqs, _, meta = load_fixture(model)
    out = tmp_path / "live.npz"
    script = os.path.join(HERE, "oracle", "make_fixtures.py")
    subprocess.run([py, script, "--live", root, "--live-out", str(out)], check=True, timeout=600)
    compare(reqs, np.load(out), run_engine(root, reqs, meta["n_decode"]))
