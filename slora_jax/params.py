"""Base-model parameters as a pytree: loading from a Hugging Face folder, or dummy weights.

Weights are stored `[in, out]` (HF Linear stores `[out, in]`; we transpose once
at load). Each layer is its own set of arrays, so a step updates nothing but
the pool and XLA sees plain per-layer matmuls.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from slora_jax.config import ModelConfig


class WeightsError(ValueError):
    """A model folder whose weights we cannot load; names the file and tensor."""


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array   # [H]
    wq: jax.Array          # [H, nq*hd]
    wk: jax.Array          # [H, nkv*hd]
    wv: jax.Array          # [H, nkv*hd]
    wo: jax.Array          # [nq*hd, H]
    mlp_norm: jax.Array    # [H]
    w_gate: jax.Array      # [H, F]
    w_up: jax.Array        # [H, F]
    w_down: jax.Array      # [F, H]


@struct.dataclass
class Params:
    embed: jax.Array                 # [V, H]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array            # [H]
    lm_head: jax.Array | None        # [H, V]; None when tied to embed


_LAYER_KEYS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


def _expected_shapes(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = mc.hidden_size, mc.intermediate_size
    return {"attn_norm": (h,), "mlp_norm": (h,), "wq": (mc.q_size, h), "wk": (mc.kv_size, h),
            "wv": (mc.kv_size, h), "wo": (h, mc.q_size), "w_gate": (f, h), "w_up": (f, h),
            "w_down": (h, f)}


def _safetensor_files(model_dir: str) -> dict[str, str]:
    """Map tensor name -> file, from model.safetensors or a sharded index."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index}: malformed index ({e})") from None
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        from safetensors import safe_open
        try:
            with safe_open(single, framework="numpy") as f:
                return {k: single for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{single}: not a readable safetensors file ({e})") from None
    raise WeightsError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                       "(only safetensors weights are loaded)")


class _TensorReader:
    """Reads tensors by name across safetensors shards, with file-naming errors."""

    def __init__(self, model_dir: str):
        self.files = _safetensor_files(model_dir)
        self._open: dict[str, object] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        from safetensors import safe_open
        path = self.files.get(name)
        if path is None:
            raise WeightsError(f"tensor '{name}' not found in the model's safetensors files")
        try:
            if path not in self._open:
                self._open[path] = safe_open(path, framework="flax")
            t = self._open[path].get_tensor(name)
        except Exception as e:
            raise WeightsError(f"{path}: cannot read tensor '{name}' ({e})") from None
        if tuple(t.shape) != shape:
            raise WeightsError(f"{path}: tensor '{name}' has shape {tuple(t.shape)}, "
                               f"the config implies {shape}")
        return t


def load_hf_params(model_dir: str, mc: ModelConfig, dtype=jnp.bfloat16) -> Params:
    """Load LlamaForCausalLM / MistralForCausalLM weights from safetensors."""
    rd = _TensorReader(model_dir)
    shapes = _expected_shapes(mc)
    cast = jax.jit(lambda x: x.astype(dtype))
    cast_t = jax.jit(lambda x: x.T.astype(dtype))
    layers = []
    for i in range(mc.num_layers):
        kw = {}
        for field, (suffix, transpose) in _LAYER_KEYS.items():
            t = rd.get(f"model.layers.{i}.{suffix}", shapes[field])
            kw[field] = cast_t(t) if transpose else cast(t)
        layers.append(LayerParams(**kw))
    embed = cast(rd.get("model.embed_tokens.weight", (mc.vocab_size, mc.hidden_size)))
    lm_head = None
    if not mc.tie_word_embeddings:
        lm_head = cast_t(rd.get("lm_head.weight", (mc.vocab_size, mc.hidden_size)))
    return Params(embed=embed, layers=tuple(layers),
                  final_norm=cast(rd.get("model.norm.weight", (mc.hidden_size,))),
                  lm_head=lm_head)


def init_dummy_params(mc: ModelConfig, dtype=jnp.bfloat16, seed: int = 0,
                      std: float = 0.02) -> Params:
    """Random weights for any config, created on the device (never on the host).

    Each layer is made by its own jitted call so peak memory is one model's
    worth, and no host buffer of the model's size ever exists.
    """
    h, f = mc.hidden_size, mc.intermediate_size

    @jax.jit
    def make_layer(key):
        ks = jax.random.split(key, 7)
        n = lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)
        return LayerParams(
            attn_norm=jnp.ones((h,), dtype), mlp_norm=jnp.ones((h,), dtype),
            wq=n(ks[0], (h, mc.q_size)), wk=n(ks[1], (h, mc.kv_size)), wv=n(ks[2], (h, mc.kv_size)),
            wo=n(ks[3], (mc.q_size, h)), w_gate=n(ks[4], (h, f)), w_up=n(ks[5], (h, f)),
            w_down=n(ks[6], (f, h)))

    @jax.jit
    def make_rest(key):
        k1, k2 = jax.random.split(key)
        embed = (jax.random.normal(k1, (mc.vocab_size, h), jnp.float32) * std).astype(dtype)
        head = None if mc.tie_word_embeddings else (
            jax.random.normal(k2, (h, mc.vocab_size), jnp.float32) * std).astype(dtype)
        return embed, head, jnp.ones((h,), dtype)

    # The seed is baked into the jitted function, so not even a scalar crosses
    # from the host (tests run this under jax.transfer_guard("disallow")).
    keys = jax.jit(lambda: tuple(jax.random.split(jax.random.PRNGKey(seed), mc.num_layers + 1)))()
    layers = tuple(make_layer(keys[i]) for i in range(mc.num_layers))
    embed, head, norm = make_rest(keys[-1])
    return Params(embed=embed, layers=layers, final_norm=norm, lm_head=head)


def params_bytes(params: Params) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))


def load_model(model: str | None, dummy: str | None, dtype_name: str):
    """(ModelConfig, Params, tokenizer or None) from a Hugging Face folder or a dummy preset
    (random weights); `dtype_name` is "float32" or "bfloat16". A GGUF file is converted to
    such a folder by the caller first."""
    from slora_jax.config import load_model_config, preset
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    if dummy:
        mc = preset(dummy)
        return mc, init_dummy_params(mc, dtype), None
    mc = load_model_config(model)
    params = load_hf_params(model, mc, dtype)
    tok = None
    tok_path = os.path.join(model, "tokenizer.json")
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_path)
    return mc, params, tok
