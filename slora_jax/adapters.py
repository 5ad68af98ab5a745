"""LoRA adapters on the host: loading PEFT folders, dummy adapters, packing into pool rows.

An adapter lives in host memory as numpy arrays, `A^T [r, in]` and `B [r, out]`
per layer and module (PEFT stores `lora_A.weight [r, in]`, `lora_B.weight
[out, r]`). `pack()` turns it into the pool-row layout of `slora_jax.pool`, which
the serving layer copies into pages when a request needs it.

Anything in a PEFT folder that we would otherwise silently drop (DoRA,
`modules_to_save`, embedding LoRA, per-module rank patterns, bias training,
shapes that do not match the base model) is refused with an error naming the
file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from slora_jax.config import HF_MODULE_NAMES, MODULES, ModelConfig
from slora_jax.pool import PoolLayout, pack_adapter_rows

_HF_TO_MODULE = {v: k for k, v in HF_MODULE_NAMES.items()}
_KEY_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter we cannot serve; the message names the file and the field."""


@dataclasses.dataclass
class LoraAdapter:
    name: str
    ranks: dict[str, int]            # module -> rank, targeted modules only
    scales: dict[str, float]         # module -> scaling applied to x·A·B
    weights: list[dict[str, tuple[np.ndarray, np.ndarray]]]  # [layer][module] = (A^T, B)
    base_model: str | None = None

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for layer in self.weights for a, b in layer.values())

    def pack(self, layout: PoolLayout, dtype=np.float32):
        """Pool rows [L, n_pages, page_size, H] and the per-module tables for a batch slot."""
        check_served_modules(self.name, self.ranks, layout)
        rows = pack_adapter_rows(self.weights, self.ranks, layout, dtype)
        offsets, _ = layout.adapter_offsets(self.ranks)
        rank = np.array([self.ranks.get(m, 0) for m in MODULES], np.int32)
        scale = np.array([self.scales.get(m, 0.0) for m in MODULES], np.float32)
        return rows, rank, scale, offsets


def check_served_modules(name: str, modules, layout: PoolLayout) -> None:
    """Refuse an adapter that targets a module outside the engine's `lora_modules`."""
    other = [m for m in modules if m not in layout.lora_modules]
    if other:
        raise AdapterError(
            f"adapter '{name}' targets modules {other} ({[HF_MODULE_NAMES[m] for m in other]}), "
            f"which this engine does not serve (lora_modules: {list(layout.lora_modules)})")


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _target_modules(value, path: str) -> set[str] | None:
    """Modules named by `target_modules`; None when it is a regex (tensors decide)."""
    if value in ("all-linear", "all_linear"):
        return set(MODULES)
    if isinstance(value, str):
        return None
    # PEFT writes `all-linear` out as fully qualified names (model.layers.0.mlp.up_proj).
    names = {n.rsplit(".", 1)[-1] for n in (value or [])}
    unknown = sorted(n for n in names if n not in _HF_TO_MODULE)
    if unknown:
        raise AdapterError(f"{path}: target_modules {unknown} are not supported "
                           f"(supported: {sorted(_HF_TO_MODULE)})")
    return {_HF_TO_MODULE[n] for n in names}


def load_peft_adapter(adapter_dir: str, mc: ModelConfig, name: str | None = None,
                      max_rank: int | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    name = name or os.path.basename(os.path.normpath(adapter_dir))
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{adapter_dir}: no adapter_config.json")
    if not os.path.isfile(st_path):
        bin_path = os.path.join(adapter_dir, "adapter_model.bin")
        why = " (adapter_model.bin is not loaded: safetensors only)" if os.path.exists(bin_path) else ""
        raise AdapterError(f"{adapter_dir}: no adapter_model.safetensors{why}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None

    ptype = cfg.get("peft_type", "LORA")
    if ptype != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type='{ptype}' is not supported (only LORA)")
    refusals = {
        "use_dora": "DoRA is not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
        "rank_pattern": "per-module rank_pattern is not supported",
        "alpha_pattern": "per-module alpha_pattern is not supported",
        "layers_to_transform": "layers_to_transform is not supported",
        "trainable_token_indices": "trainable_token_indices is not supported",
    }
    for key, why in refusals.items():
        if cfg.get(key):
            raise AdapterError(f"{cfg_path}: field '{key}'={cfg[key]!r}: {why}")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: field 'bias'={cfg['bias']!r}: only 'none' is supported")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterError(f"{cfg_path}: missing required field '{key}'")
    r_cfg, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    targets = _target_modules(cfg.get("target_modules"), cfg_path)
    # fan_in_fan_out only changes the layout of Conv1D base weights (GPT-2);
    # PEFT resets it to False for nn.Linear, and lora_A/lora_B keep their
    # Linear shapes either way, so for Llama's Linear layers it changes nothing.

    from safetensors import safe_open
    try:
        with safe_open(st_path, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise AdapterError(f"{st_path}: not a readable safetensors file ({e})") from None

    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.search(key)
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise AdapterError(f"{st_path}: tensor '{key}': embedding LoRA and DoRA "
                               "are not supported")
        if m is None:
            raise AdapterError(f"{st_path}: tensor '{key}' is not a LoRA A/B weight of a "
                               "supported module (q/k/v/o/gate/up/down_proj)")
        layer, hf_mod, ab = int(m.group(1)), m.group(2), m.group(3)
        if hf_mod not in _HF_TO_MODULE:
            raise AdapterError(f"{st_path}: tensor '{key}': module '{hf_mod}' is not supported")
        if layer >= mc.num_layers:
            raise AdapterError(f"{st_path}: tensor '{key}': layer {layer} but the base model "
                               f"has {mc.num_layers} layers (adapter for a different base model?)")
        found.setdefault((layer, _HF_TO_MODULE[hf_mod]), {})[ab] = t

    if not found:
        raise AdapterError(f"{st_path}: no LoRA weights found")
    weights: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(mc.num_layers)]
    ranks: dict[str, int] = {}
    for (layer, mod), ab in sorted(found.items()):
        if targets is not None and mod not in targets:
            raise AdapterError(f"{st_path}: weights for '{HF_MODULE_NAMES[mod]}' in layer {layer}, "
                               f"which target_modules in {cfg_path} does not name")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{st_path}: layer {layer} {HF_MODULE_NAMES[mod]} has lora_"
                               f"{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        fin, fout = mc.module_shape(mod)
        r = a.shape[0]
        if a.shape != (r, fin) or b.shape != (fout, r):
            raise AdapterError(
                f"{st_path}: layer {layer} {HF_MODULE_NAMES[mod]}: lora_A {tuple(a.shape)}, "
                f"lora_B {tuple(b.shape)} do not fit the base model's {fin}->{fout} "
                f"(expected [{r}, {fin}] and [{fout}, {r}]); adapter for a different base model?")
        if r != r_cfg:
            raise AdapterError(f"{st_path}: layer {layer} {HF_MODULE_NAMES[mod]} has rank {r} "
                               f"but {cfg_path} says r={r_cfg}")
        if max_rank is not None and r > max_rank:
            raise AdapterError(f"{cfg_path}: r={r} exceeds the engine's max_rank={max_rank}")
        ranks[mod] = r
        weights[layer][mod] = (np.ascontiguousarray(a, np.float32),
                               np.ascontiguousarray(b.T, np.float32))
    for layer in range(mc.num_layers):
        missing = sorted(set(ranks) - set(weights[layer]))
        if missing:
            raise AdapterError(f"{st_path}: layer {layer} lacks LoRA weights for "
                               f"{[HF_MODULE_NAMES[m] for m in missing]} that other layers have")
    scales = {m: _scaling(alpha, r, rslora) for m, r in ranks.items()}
    return LoraAdapter(name=name, ranks=ranks, scales=scales, weights=weights,
                       base_model=cfg.get("base_model_name_or_path"))


def dummy_adapter(mc: ModelConfig, rank: int, modules=MODULES, seed: int = 0,
                  alpha: float | None = None, std: float = 0.05,
                  name: str | None = None) -> LoraAdapter:
    """Random adapter of any rank and target set (S-LoRA's --dummy adapters)."""
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(mc.num_layers):
        layer = {}
        for m in modules:
            fin, fout = mc.module_shape(m)
            layer[m] = (rng.standard_normal((rank, fin), np.float32) * std,
                        rng.standard_normal((rank, fout), np.float32) * std)
        weights.append(layer)
    alpha = float(rank if alpha is None else alpha)
    return LoraAdapter(name=name or f"dummy-r{rank}-{seed}", ranks={m: rank for m in modules},
                       scales={m: alpha / rank for m in modules}, weights=weights)
