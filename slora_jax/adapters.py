"""LoRA adapters on the host: loading PEFT folders, dummy adapters, packing into pool rows.

An adapter lives in host memory as numpy arrays, `A^T [r, in]` and `B [r, out]`
per layer and module (PEFT stores `lora_A.weight [r, in]`, `lora_B.weight
[out, r]`). `pack()` turns it into the pool-row layout of `slora_jax.pool`, which
the serving layer copies into pages when a request needs it.

This is the boundary where adapters from outside the process are checked, once,
at load; the step assumes what passes. Anything in a PEFT folder that we would
otherwise silently drop (DoRA, `modules_to_save`, embedding LoRA, per-module
rank patterns, bias training, shapes that do not match the base model), and
anything malformed (a config that is not a JSON object, a field of the wrong
type, NaN or inf anywhere, a tensor that is not a float matrix) is refused with
an `AdapterError` naming the file and the field or tensor. Messages name files
relative to the adapter folder (`adapter_config.json: field 'r' must be a
positive integer, got 'eight'`) and quote values with `repr`, so they carry no
server path and no control character and can be shown to clients;
`AdapterError.folder` keeps the folder for the server's own log. Adapters built
in code get the same checks from `check_adapter`.

**The weight bound.** The step adds `scale * (x·A)·B` for every targeted module,
in float32 or bfloat16; both overflow past about 3.4e38 = 2^128. We refuse
weights with |w| > MAX_ABS_WEIGHT = 2^16 and scales with |scale| > MAX_ABS_SCALE
= 2^16 (scale = lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA). Under them,
with in_features <= 2^15 (Llama-70B's 28672-wide MLP input is the widest; hidden
sizes reach 8192 = 2^13) and r <= 2^6, |scale·(x·A)·B| <= 2^16 · 2^6 · 2^15 · 2^16
· 2^16 · max|x| = 2^69 · max|x|, finite for activations up to 2^58 (about 3e17;
a real model's largest activations are near 1e4). Trained LoRA weights sit far
below 1 (the demo adapters' largest is 0.19), so the bound refuses only
corrupted or hostile files, such as a trained tensor multiplied by 1e25.

**Adapter names** are 1 to 128 characters from `A-Z a-z 0-9 . _ : @ + -`,
starting with a letter or a digit (`check_adapter_name`): they are model ids in
the API and appear in logs and metrics, so no path separator, space or control
character.
"""

from __future__ import annotations

import dataclasses
import functools
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
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_ABS_WEIGHT = 2.0 ** 16   # see the module docstring
MAX_ABS_SCALE = 2.0 ** 16


class AdapterError(ValueError):
    """An adapter we cannot serve.

    The message names the file (relative to the adapter folder) and the field,
    and holds no server path: clients may see it. `folder` is the adapter's
    folder on the server (None when it was not read from disk), for the log.
    """

    def __init__(self, message: str, folder: str | None = None):
        super().__init__(message)
        self.folder = folder


def _show(value, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: escapes control characters, bounds the size."""
    try:
        r = repr(value)
    except ValueError:                  # an int past Python's digit limit
        r = f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[:limit] + "..."


def _printable(text: str, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def check_adapter_name(name) -> None:
    """Refuse a name outside the documented set (see the module docstring)."""
    if not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        raise AdapterError(f"adapter name {_show(name, 40)} is not allowed: names are 1 to 128 "
                           "characters from A-Za-z0-9._:@+- and start with a letter or digit")


def _check_weight(t, where: str, folder: str | None = None) -> None:
    """Refuse anything but a float matrix of finite values within MAX_ABS_WEIGHT."""
    if not isinstance(t, np.ndarray) or t.ndim != 2:
        shape = tuple(t.shape) if isinstance(t, np.ndarray) else type(t).__name__
        raise AdapterError(f"{where} has shape {shape}; a LoRA weight is a matrix", folder)
    if not np.issubdtype(t.dtype, np.floating):
        raise AdapterError(f"{where} has dtype {t.dtype}; LoRA weights are floating point",
                           folder)
    if t.size == 0:
        return
    # NaN propagates to both, no temporary copy; compared as Python floats, since the
    # bound itself would round to inf in float16.
    lo, hi = float(t.min()), float(t.max())
    if lo >= -MAX_ABS_WEIGHT and hi <= MAX_ABS_WEIGHT:
        return
    if math.isnan(lo) or math.isnan(hi):
        what = "NaN"
    elif math.isinf(lo) or math.isinf(hi):
        what = "inf"
    else:
        what = f"|w| = {max(abs(lo), abs(hi)):.3g}"
    raise AdapterError(f"{where} holds {what}: weights must be finite with |w| <= "
                       f"{MAX_ABS_WEIGHT:g}, or the step's float arithmetic overflows", folder)


def _check_scale(scale: float, where: str, folder: str | None = None) -> None:
    if not (isinstance(scale, (int, float, np.floating)) and not isinstance(scale, bool)
            and math.isfinite(scale) and abs(scale) <= MAX_ABS_SCALE):
        raise AdapterError(f"{where} gives the scale {_show(scale)}: it must be finite with "
                           f"|scale| <= {MAX_ABS_SCALE:g}, or the step's float arithmetic "
                           "overflows", folder)


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


def check_adapter(ad: LoraAdapter, mc: ModelConfig | None = None) -> None:
    """Refuse an adapter built in code that the step could not serve: what
    `load_peft_adapter` checks in a folder (known modules, positive integer ranks,
    finite bounded scales, float matrices `A^T [r, in]`, `B [r, out]` of finite
    bounded weights; the base model's shapes when `mc` is given)."""
    who = f"adapter {_show(ad.name, 40)}"
    unknown = [m for m in ad.ranks if m not in MODULES]
    if unknown:
        raise AdapterError(f"{who}: unknown modules {_show(unknown)} (have {list(MODULES)})")
    for m, r in ad.ranks.items():
        if not (isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 1):
            raise AdapterError(f"{who}: rank {_show(r)} of {HF_MODULE_NAMES[m]} must be a "
                               "positive integer")
        if m not in ad.scales:
            raise AdapterError(f"{who}: no scale for {HF_MODULE_NAMES[m]}")
        _check_scale(ad.scales[m], f"{who}: {HF_MODULE_NAMES[m]}")
    if mc is not None and len(ad.weights) != mc.num_layers:
        raise AdapterError(f"{who}: {len(ad.weights)} layers of weights, but the base model "
                           f"has {mc.num_layers}")
    for li, layer in enumerate(ad.weights):
        extra = [m for m in layer if m not in ad.ranks]
        if extra:
            raise AdapterError(f"{who}: layer {li} has weights for {_show(extra)}, which have "
                               "no rank")
        for m, ab in layer.items():
            where = f"{who}: layer {li} {HF_MODULE_NAMES[m]}"
            if not (isinstance(ab, tuple) and len(ab) == 2):
                raise AdapterError(f"{where}: weights must be a pair (A^T, B)")
            a_t, b = ab
            _check_weight(a_t, f"{where} A^T")
            _check_weight(b, f"{where} B")
            fin, fout = mc.module_shape(m) if mc is not None else (a_t.shape[1], b.shape[1])
            if a_t.shape != (ad.ranks[m], fin) or b.shape != (ad.ranks[m], fout):
                raise AdapterError(f"{where}: A^T {a_t.shape}, B {b.shape}; expected "
                                   f"[{ad.ranks[m]}, {fin}] and [{ad.ranks[m]}, {fout}]")


def check_served_modules(name: str, modules, layout: PoolLayout) -> None:
    """Refuse an adapter that targets a module outside the engine's `lora_modules`."""
    other = [m for m in modules if m not in layout.lora_modules]
    if other:
        raise AdapterError(
            f"adapter '{name}' targets modules {other} ({[HF_MODULE_NAMES[m] for m in other]}), "
            f"which this engine does not serve (lora_modules: {list(layout.lora_modules)})")


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _target_modules(value, folder: str) -> set[str] | None:
    """Modules named by `target_modules`; None when it is a regex or absent (tensors decide)."""
    if value in ("all-linear", "all_linear"):
        return set(MODULES)
    if value is None or isinstance(value, str):
        return None
    if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise AdapterError(f"{CONFIG_FILE}: field 'target_modules' must be a list of module "
                           f"names or a regex string, got {_show(value)}", folder)
    # PEFT writes `all-linear` out as fully qualified names (model.layers.0.mlp.up_proj).
    names = {n.rsplit(".", 1)[-1] for n in value}
    unknown = sorted(n for n in names if n not in _HF_TO_MODULE)
    if unknown:
        raise AdapterError(f"{CONFIG_FILE}: field 'target_modules' names {_show(unknown)}, "
                           f"which are not supported (supported: {sorted(_HF_TO_MODULE)})",
                           folder)
    return {_HF_TO_MODULE[n] for n in names}


def _is_set(value) -> bool:
    """A PEFT option in use: not null, false or empty (0 is a layer index, so it counts)."""
    return not (value is None or value is False
                or (isinstance(value, (str, list, dict)) and not value))


def _read_config(adapter_dir: str) -> dict:
    try:
        with open(os.path.join(adapter_dir, CONFIG_FILE), "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AdapterError(f"{CONFIG_FILE}: cannot be read ({e.strerror or type(e).__name__})",
                           adapter_dir) from None
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:   # bad JSON, bad UTF-8, nesting too deep
        raise AdapterError(f"{CONFIG_FILE}: not valid JSON ({_printable(str(e))})",
                           adapter_dir) from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE}: must hold a JSON object, got a "
                           f"{type(cfg).__name__}", adapter_dir)
    return cfg


def _lora_hyperparameters(cfg: dict, folder: str) -> tuple[int, float]:
    """(r, scale) from the config, each checked for type and range."""
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterError(f"{CONFIG_FILE}: missing required field '{key}'", folder)
    r = cfg["r"]
    if type(r) is not int or r < 1:
        raise AdapterError(f"{CONFIG_FILE}: field 'r' must be a positive integer, got "
                           f"{_show(r)}", folder)
    alpha = cfg["lora_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{CONFIG_FILE}: field 'lora_alpha' must be a number, got "
                           f"{_show(alpha)}", folder)
    try:
        alpha = float(alpha)
    except OverflowError:               # an int beyond float range
        alpha = math.inf
    if not math.isfinite(alpha):
        raise AdapterError(f"{CONFIG_FILE}: field 'lora_alpha' must be finite, got "
                           f"{_show(cfg['lora_alpha'])}", folder)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"{CONFIG_FILE}: field 'use_rslora' must be true or false, got "
                           f"{_show(rslora)}", folder)
    scale = _scaling(alpha, r, rslora)
    _check_scale(scale, f"{CONFIG_FILE}: field 'lora_alpha'={alpha:g} with r={r}", folder)
    return r, scale


def load_peft_adapter(adapter_dir: str, mc: ModelConfig, name: str | None = None,
                      max_rank: int | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    Raises `AdapterError` (and nothing else) for a folder we cannot serve; its
    message names the file relative to `adapter_dir`, its `folder` is `adapter_dir`.
    """
    name = name or os.path.basename(os.path.normpath(adapter_dir))
    cfg_path = os.path.join(adapter_dir, CONFIG_FILE)
    st_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{CONFIG_FILE}: not found in the adapter folder", adapter_dir)
    if not os.path.isfile(st_path):
        bin_path = os.path.join(adapter_dir, "adapter_model.bin")
        why = " (adapter_model.bin is not loaded: safetensors only)" if os.path.exists(bin_path) else ""
        raise AdapterError(f"{WEIGHTS_FILE}: not found in the adapter folder{why}", adapter_dir)
    cfg = _read_config(adapter_dir)

    def refuse(msg: str):
        return AdapterError(msg, adapter_dir)

    ptype = cfg.get("peft_type", "LORA")
    if ptype != "LORA":
        raise refuse(f"{CONFIG_FILE}: field 'peft_type'={_show(ptype)} is not supported "
                     "(only 'LORA')")
    refusals = {
        "use_dora": "DoRA is not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
        "rank_pattern": "per-module rank_pattern is not supported",
        "alpha_pattern": "per-module alpha_pattern is not supported",
        "layers_to_transform": "layers_to_transform is not supported",
        "trainable_token_indices": "trainable_token_indices is not supported",
    }
    for key, why in refusals.items():
        if _is_set(cfg.get(key)):
            raise refuse(f"{CONFIG_FILE}: field '{key}'={_show(cfg[key])}: {why}")
    if cfg.get("bias", "none") != "none":
        raise refuse(f"{CONFIG_FILE}: field 'bias'={_show(cfg['bias'])}: only 'none' is "
                     "supported")
    r_cfg, scale = _lora_hyperparameters(cfg, adapter_dir)
    targets = _target_modules(cfg.get("target_modules"), adapter_dir)
    # fan_in_fan_out only changes the layout of Conv1D base weights (GPT-2);
    # PEFT resets it to False for nn.Linear, and lora_A/lora_B keep their
    # Linear shapes either way, so for Llama's Linear layers it changes nothing.

    from safetensors import safe_open
    try:
        with safe_open(st_path, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - the library raises several types
        reason = str(e).replace(st_path, WEIGHTS_FILE).replace(adapter_dir, ".")
        raise refuse(f"{WEIGHTS_FILE}: not a readable safetensors file "
                     f"({_printable(reason)})") from None

    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        tensor = f"{WEIGHTS_FILE}: tensor {_show(key, 200)}"
        m = _KEY_RE.search(key)
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise refuse(f"{tensor}: embedding LoRA and DoRA are not supported")
        if m is None:
            raise refuse(f"{tensor} is not a LoRA A/B weight of a supported module "
                         "(q/k/v/o/gate/up/down_proj)")
        layer, hf_mod, ab = int(m.group(1)), m.group(2), m.group(3)
        if hf_mod not in _HF_TO_MODULE:
            raise refuse(f"{tensor}: module {_show(hf_mod)} is not supported")
        if layer >= mc.num_layers:
            raise refuse(f"{tensor}: layer {layer} but the base model has {mc.num_layers} "
                         "layers (adapter for a different base model?)")
        _check_weight(t, tensor, adapter_dir)
        found.setdefault((layer, _HF_TO_MODULE[hf_mod]), {})[ab] = t

    if not found:
        raise refuse(f"{WEIGHTS_FILE}: no LoRA weights found")
    weights: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(mc.num_layers)]
    ranks: dict[str, int] = {}
    for (layer, mod), ab in sorted(found.items()):
        if targets is not None and mod not in targets:
            raise refuse(f"{WEIGHTS_FILE}: weights for '{HF_MODULE_NAMES[mod]}' in layer "
                         f"{layer}, which field 'target_modules' in {CONFIG_FILE} does not name")
        if set(ab) != {"A", "B"}:
            raise refuse(f"{WEIGHTS_FILE}: layer {layer} {HF_MODULE_NAMES[mod]} has lora_"
                         f"{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        fin, fout = mc.module_shape(mod)
        r = a.shape[0]
        if a.shape != (r, fin) or b.shape != (fout, r):
            raise refuse(
                f"{WEIGHTS_FILE}: layer {layer} {HF_MODULE_NAMES[mod]}: lora_A {tuple(a.shape)}, "
                f"lora_B {tuple(b.shape)} do not fit the base model's {fin}->{fout} "
                f"(expected [{r}, {fin}] and [{fout}, {r}]); adapter for a different base model?")
        if r != r_cfg:
            raise refuse(f"{WEIGHTS_FILE}: layer {layer} {HF_MODULE_NAMES[mod]} has rank {r} "
                         f"but field 'r' in {CONFIG_FILE} says {r_cfg}")
        if max_rank is not None and r > max_rank:
            raise refuse(f"{CONFIG_FILE}: field 'r'={r} exceeds the engine's "
                         f"max_rank={max_rank}")
        ranks[mod] = r
        weights[layer][mod] = (np.ascontiguousarray(a, np.float32),
                               np.ascontiguousarray(b.T, np.float32))
    for layer in range(mc.num_layers):
        missing = sorted(set(ranks) - set(weights[layer]))
        if missing:
            raise refuse(f"{WEIGHTS_FILE}: layer {layer} lacks LoRA weights for "
                         f"{[HF_MODULE_NAMES[m] for m in missing]} that other layers have")
    base = cfg.get("base_model_name_or_path")
    return LoraAdapter(name=name, ranks=ranks, scales={m: scale for m in ranks}, weights=weights,
                       base_model=base if isinstance(base, str) else None)


def dummy_adapter(mc: ModelConfig, rank: int, modules=MODULES, seed: int = 0,
                  alpha: float | None = None, std: float = 0.05,
                  name: str | None = None) -> LoraAdapter:
    """Random adapter of any rank and target set (S-LoRA's --dummy adapters)."""
    who = f"dummy adapter {_show(name)}"
    if not (isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) and rank >= 1):
        raise AdapterError(f"{who}: rank {_show(rank)} must be a positive integer")
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise AdapterError(f"{who}: unknown modules {_show(unknown)} (have {list(MODULES)})")
    alpha = float(rank if alpha is None else alpha)
    _check_scale(alpha / rank, f"{who}: lora_alpha/r")
    # The weights are std times a standard normal of at most 6 in magnitude: bound std so
    # that they pass `check_adapter` without scanning them.
    if not (isinstance(std, (int, float)) and 0 <= std * 6 <= MAX_ABS_WEIGHT):
        raise AdapterError(f"{who}: std {_show(std)} must be finite, >= 0 and at most "
                           f"{MAX_ABS_WEIGHT / 6:g}")
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(mc.num_layers):
        layer = {}
        for m in modules:
            fin, fout = mc.module_shape(m)
            layer[m] = (_normal(rng, (rank, fin), std), _normal(rng, (rank, fout), std))
        weights.append(layer)
    return LoraAdapter(name=name or f"dummy-r{rank}-{seed}", ranks={m: rank for m in modules},
                       scales={m: alpha / rank for m in modules}, weights=weights)


_NOISE_SIZE = 1 << 22


@functools.lru_cache(maxsize=1)
def _noise() -> np.ndarray:
    """4M standard normals, drawn once per process (16 MiB), clipped to +-6 (a bound the
    weight check relies on; a normal passes 6 once in 5e8 draws)."""
    z = np.clip(np.random.default_rng(0x51DA).standard_normal(_NOISE_SIZE, np.float32), -6.0,
                6.0)
    z.flags.writeable = False        # dummies with std 1 hold views of it
    return z


def _normal(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    """A window of the shared noise at a random offset, scaled: a thousand 7B dummies are
    made at copy speed (drawing fresh normals took 37 s), and seeds still give different
    adapters."""
    n = shape[0] * shape[1]
    if n > _NOISE_SIZE // 2:
        return np.clip(rng.standard_normal(shape, np.float32), -6.0, 6.0) * np.float32(std)
    start = int(rng.integers(0, _NOISE_SIZE - n))
    window = _noise()[start:start + n].reshape(shape)
    # std 1: the window itself (read-only), so a dummy takes no memory until it is packed
    return window if std == 1 else window * np.float32(std)


def save_peft_adapter(adapter: LoraAdapter, path: str, alpha: float | None = None) -> None:
    """Write `adapter` as a PEFT LoRA folder (adapter_config.json + safetensors).

    All modules must share one rank and one scale (PEFT's single `r` and
    `lora_alpha`); `alpha` defaults to scale * r.
    """
    from safetensors.numpy import save_file
    ranks = set(adapter.ranks.values())
    if len(ranks) != 1:
        raise AdapterError(f"adapter '{adapter.name}': PEFT needs one rank, has {sorted(ranks)}")
    r = ranks.pop()
    scale = next(iter(adapter.scales.values()))
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for li, mods in enumerate(adapter.weights):
        for m, (a_t, b) in mods.items():
            part = "self_attn" if m in ("q", "k", "v", "o") else "mlp"
            base = f"base_model.model.model.layers.{li}.{part}.{HF_MODULE_NAMES[m]}"
            tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(a_t, np.float32)
            tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha if alpha is not None else scale * r,
           "target_modules": sorted(HF_MODULE_NAMES[m] for m in adapter.ranks),
           "bias": "none", "task_type": "CAUSAL_LM"}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
