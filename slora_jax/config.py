"""Static configuration: the model's shape and the engine's shapes.

Everything here is a frozen dataclass, hashable, and passed to jitted functions
as a static argument. Anything that varies from step to step is an array in a
`Batch` (see `slora_jax.step`), never a field here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from pallas_kernels.geometry import ceil_div, round_up  # noqa: F401

# The LoRA target modules we support, in the fixed order used for the pool
# layout and for every per-module table in a batch.
MODULES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULE_NAMES: dict[str, str] = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


class ConfigError(ValueError):
    """A model or engine configuration that we cannot serve; names file and field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "q": (h, self.q_size), "k": (h, self.kv_size), "v": (h, self.kv_size),
            "o": (self.q_size, h), "gate": (h, f), "up": (h, f), "down": (f, h),
        }[module]

    def num_params(self) -> int:
        per_layer = sum(i * o for i, o in (self.module_shape(m) for m in MODULES))
        per_layer += 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (self.num_layers * per_layer + self.vocab_size * self.hidden_size
                + head + self.hidden_size)

    def with_(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _req(cfg: dict, key: str, path: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{path}: missing required field '{key}'")
    return cfg[key]


def model_config_from_hf(cfg: dict, path: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict.

    Accepts LlamaForCausalLM and MistralForCausalLM, with rope settings either
    in the transformers-4 keys (`rope_theta`, `rope_scaling`) or the
    transformers-5 `rope_parameters` dict.
    """
    archs = cfg.get("architectures") or []
    supported = {"LlamaForCausalLM", "MistralForCausalLM"}
    if archs and not supported.intersection(archs):
        raise ConfigError(f"{path}: architectures={archs} is not supported "
                          f"(supported: {sorted(supported)})")
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConfigError(f"{path}: model_type='{model_type}' is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{path}: {flag}=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act='{act}' is not supported (only silu)")

    h = int(_req(cfg, "hidden_size", path))
    n_heads = int(_req(cfg, "num_attention_heads", path))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or h // n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{path}: num_attention_heads={n_heads} is not a multiple "
                          f"of num_key_value_heads={n_kv}")

    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = rope if rope.get("rope_type") not in (None, "default") else scaling
    rope_scaling = None
    if rope_type == "llama3":
        try:
            rope_scaling = RopeScaling(
                factor=float(src["factor"]),
                low_freq_factor=float(src["low_freq_factor"]),
                high_freq_factor=float(src["high_freq_factor"]),
                original_max_position_embeddings=int(src["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"{path}: rope scaling of type llama3 lacks field {e}") from None
    elif rope_type != "default":
        raise ConfigError(f"{path}: rope_type='{rope_type}' is not supported "
                          "(supported: default, llama3)")

    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=int(_req(cfg, "vocab_size", path)),
        hidden_size=h,
        intermediate_size=int(_req(cfg, "intermediate_size", path)),
        num_layers=int(_req(cfg, "num_hidden_layers", path)),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=cfg.get("_name_or_path") or model_type,
    )


def load_model_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{model_dir}: no config.json in the model folder")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    mc = model_config_from_hf(cfg, path)
    return mc.with_(name=os.path.basename(os.path.normpath(model_dir)))


_PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "models")


def preset(name: str) -> ModelConfig:
    """A model shape from configs/models/<name>.json (HF config.json format)."""
    path = os.path.join(_PRESET_DIR, f"{name}.json")
    if not os.path.isfile(path):
        have = sorted(p[:-5] for p in os.listdir(_PRESET_DIR) if p.endswith(".json"))
        raise ConfigError(f"unknown model preset '{name}' (have: {', '.join(have)})")
    with open(path) as f:
        return model_config_from_hf(json.load(f), path).with_(name=name)


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Shapes of the pool and of the bucketed batches. Static.

    page_size: rows of `hidden_size` elements per pool page. A KV page holds
      `tokens_per_page` tokens (K then V); an adapter takes whole pages.
    num_pages: pages per layer (page 0 is the null page: never allocated, the
      target of writes from padding).
    max_rank: the largest LoRA rank a slot can hold (bounds the adapter tables).
    max_batch: requests per decode step; max_prefill_tokens: tokens per prefill.
    max_context: the longest sequence (prompt + output) a request may reach.
    lora_modules: the modules adapters may target (default: all of MODULES). The
      step computes LoRA terms for these only, and an adapter that targets another
      is refused when it is loaded (as vLLM fixes its LoRA modules at start-up).
    """
    page_size: int = 16
    num_pages: int = 512
    max_rank: int = 64
    max_batch: int = 32
    max_prefill_tokens: int = 512
    max_prefill_requests: int = 8
    max_context: int = 2048
    max_adapters_per_batch: int = 32
    decode_buckets: tuple[int, ...] | None = None
    prefill_token_buckets: tuple[int, ...] | None = None
    # "auto": the Pallas Mosaic GPU kernels on a GPU, the jnp references elsewhere.
    # Shapes a kernel does not serve take the reference and say so once in the log.
    lora_backend: str = "auto"
    attention_backend: str = "auto"
    lora_modules: tuple[str, ...] = MODULES
    def __post_init__(self):
        mods = tuple(self.lora_modules)
        bad = [m for m in mods if m not in MODULES]
        if bad:
            raise ValueError(f"lora_modules: unknown modules {bad} (have {list(MODULES)})")
        object.__setattr__(self, "lora_modules", tuple(m for m in MODULES if m in mods))
        for k in ("decode_buckets", "prefill_token_buckets"):    # YAML gives lists
            if getattr(self, k) is not None:
                object.__setattr__(self, k, tuple(getattr(self, k)))

    def batch_buckets(self) -> tuple[int, ...]:
        return self.decode_buckets or _pow2_buckets(1, self.max_batch)

    def token_buckets(self) -> tuple[int, ...]:
        return self.prefill_token_buckets or _pow2_buckets(16, self.max_prefill_tokens)

    def request_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(1, self.max_prefill_requests)

    @staticmethod
    def bucket(buckets: tuple[int, ...], n: int, what: str) -> int:
        for b in buckets:
            if n <= b:
                return b
        raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}")


__all__ = ["MODULES", "HF_MODULE_NAMES", "ConfigError", "RopeScaling", "ModelConfig",
           "EngineConfig", "model_config_from_hf", "load_model_config", "preset",
           "ceil_div", "round_up"]
