"""The default model (SmolLM2-135M-Instruct) end to end, on the CPU, in float32.

(a) Greedy decoding through the engine reproduces transformers' tokens
    (tests/fixtures/smollm2/hf_greedy.json).
(b) The demo adapters in adapters/demo (trained by examples/train_lora.py)
    change the answers to held-out questions the way they were trained to,
    per request, with the base model and both adapters in one batch.

Skipped only when the default model cannot be fetched or converted.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "smollm2", "hf_greedy.json")
DEMO = os.path.join(ROOT, "adapters", "demo")


@pytest.fixture(scope="module")
def default_model():
    from slora_jax.config import load_model_config
    from serving.gguf_convert import default_model_dir
    from slora_jax.params import load_hf_params
    try:
        model_dir = str(default_model_dir(dtype="bfloat16"))
    except RuntimeError as e:
        pytest.skip(f"default model unavailable: {e}")
    mc = load_model_config(model_dir)
    return model_dir, mc, load_hf_params(model_dir, mc, jnp.float32)


@pytest.fixture(scope="module")
def engine(default_model):
    from slora_jax.adapters import load_peft_adapter
    from examples.train_lora import make_engine
    _, mc, params = default_model
    eng = make_engine(params, mc, max_batch=8, max_context=128, max_rank=8, n_adapters=2)
    for name in ("caps", "signature"):
        eng.add_adapter(load_peft_adapter(os.path.join(DEMO, name), mc, name=name))
    return eng


def test_greedy_matches_transformers(engine):
    from serving.offline import Request
    with open(FIXTURE) as f:
        fx = json.load(f)
    n = fx["max_new_tokens"]
    (res,) = engine.generate([Request("hf", fx["prompt_ids"], max_tokens=n)])
    assert res.error is None
    assert res.token_ids == fx["generated_ids"]


def _upper_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


@pytest.mark.slow     # 50 s on 2 cores; the default model itself is checked by the tests above
def test_demo_adapters_in_one_batch(default_model, engine):
    from serving.offline import Request
    from examples.train_lora import HELDOUT, SIGNATURE, Chat
    chat = Chat(default_model[0])
    questions = [HELDOUT[0], HELDOUT[3]]   # never trained on
    reqs = [Request(f"{i}-{name}", chat.prompt_ids(q), adapter=name, max_tokens=40,
                    stop_token_ids=(2,))
            for i, q in enumerate(questions) for name in (None, "caps", "signature")]
    # one wave: the base model and both adapters decode side by side
    assert len(reqs) <= engine.ec.max_batch
    res = {r.id: r for r in engine.generate(reqs)}
    for i, q in enumerate(questions):
        base, caps, sig = (chat.decode(res[f"{i}-{n}"].token_ids).strip()
                           for n in (None, "caps", "signature"))
        ctx = f"{q!r}: base={base!r} caps={caps!r} signature={sig!r}"
        assert _upper_fraction(caps) > 0.95, ctx
        assert sum(c.isalpha() for c in caps) >= 5, ctx
        assert res[f"{i}-signature"].finish_reason == "stop", ctx
        assert sig.endswith(SIGNATURE.strip()), ctx
        assert _upper_fraction(base) < 0.5, ctx
        assert SIGNATURE.strip() not in base and "slora" not in caps.lower(), ctx


def test_model_flag_accepts_a_gguf_file():
    """A GGUF file converts once (what `--model FILE.gguf` does) and loads like a folder."""
    import glob

    from slora_jax.params import load_model
    from slora_jax.config import load_model_config
    from serving.gguf_convert import _cache_root, default_model_dir
    try:
        folder = default_model_dir(dtype="bfloat16")
    except RuntimeError as e:
        pytest.skip(f"default model unavailable: {e}")
    ggufs = glob.glob(str(_cache_root(None) / "gguf" / "*.gguf"))
    if not ggufs:
        pytest.skip("no cached GGUF file")
    from serving.gguf_convert import hf_dir_for_gguf
    mc, params, tok = load_model(str(hf_dir_for_gguf(ggufs[0])), None, "bfloat16")
    assert mc.with_(name="x") == load_model_config(str(folder)).with_(name="x")
    assert tok is not None and params.layers[0].wq.shape == (mc.hidden_size, mc.q_size)
