"""Write Hugging Face model folders and PEFT adapter folders from our pytrees (tests only).

The files use HF's and PEFT's names and layouts (Linear weights [out, in],
lora_A [r, in], lora_B [out, r]), so the loaders are tested on real formats.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from slora_jax.adapters import LoraAdapter
from slora_jax.config import HF_MODULE_NAMES, ModelConfig

_ATTN = {"q", "k", "v", "o"}


def write_hf_model(path: str, mc: ModelConfig, params) -> str:
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
           "num_hidden_layers": mc.num_layers, "num_attention_heads": mc.num_heads,
           "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
           "vocab_size": mc.vocab_size, "rms_norm_eps": mc.rms_norm_eps,
           "rope_theta": mc.rope_theta, "max_position_embeddings": mc.max_position_embeddings,
           "tie_word_embeddings": mc.tie_word_embeddings, "hidden_act": "silu"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = {"model.embed_tokens.weight": np.asarray(params.embed, np.float32),
         "model.norm.weight": np.asarray(params.final_norm, np.float32)}
    if params.lm_head is not None:
        t["lm_head.weight"] = np.asarray(params.lm_head, np.float32).T.copy()
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj"}
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.asarray(lp.attn_norm, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.asarray(lp.mlp_norm, np.float32)
        for field, name in names.items():
            t[p + name + ".weight"] = np.asarray(getattr(lp, field), np.float32).T.copy()
    save_file(t, os.path.join(path, "model.safetensors"))
    return path


def write_peft_adapter(path: str, adapter: LoraAdapter, alpha: float, rslora: bool = False,
                       extra_config: dict | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    r = next(iter(adapter.ranks.values()))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "target_modules": [HF_MODULE_NAMES[m] for m in adapter.ranks],
           "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": "tiny"}
    cfg.update(extra_config or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    t = {}
    for i, layer in enumerate(adapter.weights):
        for m, (a_t, b) in layer.items():
            kind = "self_attn" if m in _ATTN else "mlp"
            p = f"base_model.model.model.layers.{i}.{kind}.{HF_MODULE_NAMES[m]}"
            t[p + ".lora_A.weight"] = np.ascontiguousarray(a_t, np.float32)
            t[p + ".lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    save_file(t, os.path.join(path, "adapter_model.safetensors"))
    return path
