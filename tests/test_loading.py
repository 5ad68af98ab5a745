"""Loading models and PEFT adapters, and bad input: each error names the problem."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, tiny_engine_config
from hf_files import write_hf_model, write_peft_adapter
from serving.offline import OfflineEngine, Request
from slora_jax.adapters import AdapterError, dummy_adapter, load_peft_adapter
from slora_jax.config import ConfigError, load_model_config, model_config_from_hf, preset
from slora_jax.params import WeightsError, init_dummy_params, load_hf_params


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    mc = TINY["gqa"]
    params = init_dummy_params(mc, jnp.float32, seed=3, std=0.2)
    path = write_hf_model(str(tmp_path_factory.mktemp("m") / "tiny"), mc, params)
    return path, mc, params


def test_hf_roundtrip(hf_model):
    path, mc, params = hf_model
    mc2 = load_model_config(path)
    assert mc2.with_(name=mc.name) == mc
    p2 = load_hf_params(path, mc2, jnp.float32)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_peft_roundtrip_and_scaling(tmp_path):
    mc = TINY["mha"]
    ad = dummy_adapter(mc, 4, ("q", "k", "down"), seed=5)
    write_peft_adapter(str(tmp_path / "a"), ad, alpha=8)
    got = load_peft_adapter(str(tmp_path / "a"), mc)
    assert got.ranks == {"q": 4, "k": 4, "down": 4}
    assert got.scales == {m: 2.0 for m in ("q", "k", "down")}
    for l1, l2 in zip(ad.weights, got.weights):
        for m in l1:
            np.testing.assert_array_equal(l1[m][0], l2[m][0])
            np.testing.assert_array_equal(l1[m][1], l2[m][1])
    write_peft_adapter(str(tmp_path / "rs"), ad, alpha=8, rslora=True)
    assert load_peft_adapter(str(tmp_path / "rs"), mc).scales["q"] == pytest.approx(8 / 2)
    write_peft_adapter(str(tmp_path / "al"), dummy_adapter(mc, 2, ("q", "k", "v", "o", "gate", "up", "down")),
                       alpha=2, extra_config={"target_modules": "all-linear"})
    assert len(load_peft_adapter(str(tmp_path / "al"), mc).ranks) == 7


def test_presets_load():
    for name in ("llama-7b", "llama-13b", "llama-30b", "llama-70b", "llama-3-8b", "tiny"):
        mc = preset(name)
        assert mc.hidden_size % mc.num_heads == 0
    assert preset("llama-7b").num_params() == pytest.approx(6.74e9, rel=0.01)
    assert preset("llama-3-8b").num_params() == pytest.approx(8.03e9, rel=0.01)
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        preset("nope")


def test_transformers5_rope_parameters():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": 10,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}}
    mc = model_config_from_hf(cfg)
    assert mc.rope_theta == 5e5 and mc.rope_scaling.factor == 8.0


# --- bad input -------------------------------------------------------------------

def test_corrupt_safetensors(hf_model, tmp_path):
    path, mc, _ = hf_model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    blob = open(os.path.join(path, "model.safetensors"), "rb").read()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_hf_params(str(bad), mc, jnp.float32)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a readable safetensors"):
        load_hf_params(str(bad), mc, jnp.float32)


def test_missing_config_field(tmp_path):
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required field 'num_hidden_layers'"):
        load_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(str(tmp_path))


def test_weights_shape_mismatch(hf_model):
    path, mc, _ = hf_model
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        load_hf_params(path, mc.with_(intermediate_size=99), jnp.float32)
    with pytest.raises(WeightsError, match=r"tensor 'model.layers.2.input_layernorm.weight' not found"):
        load_hf_params(path, mc.with_(num_layers=3), jnp.float32)


def test_adapter_for_other_base_model(tmp_path):
    ad = dummy_adapter(TINY["mha"], 4, ("q", "v"))
    write_peft_adapter(str(tmp_path / "a"), ad, alpha=4)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: layer 0 q_proj.*different base model"):
        load_peft_adapter(str(tmp_path / "a"), TINY["gqa"])


@pytest.mark.parametrize("field,value,msg", [
    ("use_dora", True, "DoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
    ("target_modules", ["q_proj", "embed_tokens"], "embed_tokens"),
    ("bias", "all", "bias"),
])
def test_unsupported_adapter_fields_refused(tmp_path, field, value, msg):
    ad = dummy_adapter(TINY["mha"], 2, ("q",))
    write_peft_adapter(str(tmp_path / "a"), ad, alpha=2, extra_config={field: value})
    with pytest.raises(AdapterError, match=f"adapter_config.json.*{msg}"):
        load_peft_adapter(str(tmp_path / "a"), TINY["mha"])


def test_corrupt_adapter_file(tmp_path):
    ad = dummy_adapter(TINY["mha"], 2, ("q",))
    path = write_peft_adapter(str(tmp_path / "a"), ad, alpha=2)
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(b"nonsense")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not a readable"):
        load_peft_adapter(path, TINY["mha"])


def test_bad_requests_do_not_stop_the_batch():
    mc = TINY["mha"]
    params = init_dummy_params(mc, jnp.float32, seed=1, std=0.25)
    eng = OfflineEngine(params, mc, tiny_engine_config(), jnp.float32)
    eng.add_adapter(dummy_adapter(mc, 2, ("q",), name="a"))
    reqs = [Request("ok1", [1, 2, 3], "a", max_tokens=4),
            Request("long", list(range(60)), None, max_tokens=10),
            Request("unknown", [1], "nope", max_tokens=4),
            Request("vocab", [1, 5000], None, max_tokens=4),
            Request("ok2", [4, 5], None, max_tokens=4)]
    free = eng.allocator.num_free
    res = {r.id: r for r in eng.generate(reqs)}
    assert "exceeds the context of 64" in res["long"].error
    assert "unknown adapter 'nope'" in res["unknown"].error
    assert "outside the vocabulary" in res["vocab"].error
    assert len(res["ok1"].token_ids) == 4 and len(res["ok2"].token_ids) == 4
    assert res["ok1"].error is None and res["ok2"].error is None
    assert eng.allocator.num_free + eng.allocator.pages_used("adapter") == free


def test_dummy_params_never_touch_the_host():
    """Dummy weights are made on the device: no host->device transfer at all, so a
    Llama-7B dummy model needs no host buffer of its size (shape-checked abstractly)."""
    mc = preset("tiny")
    with jax.transfer_guard("disallow"):
        p = init_dummy_params(mc, jnp.bfloat16)
    assert p.layers[0].w_gate.shape == (mc.hidden_size, mc.intermediate_size)
    big = preset("llama-7b")
    shapes = jax.eval_shape(lambda: init_dummy_params(big, jnp.bfloat16))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == big.num_params()
