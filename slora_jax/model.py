"""The Llama transformer over the unified pool, with heterogeneous-batch LoRA.

`transformer()` runs the layers on a flat token array. It knows nothing of
prefill or decode: the caller passes `attend(layer_index, pool_layer, q, k, v)`,
which writes K/V into the pool and returns the attention output. The LoRA terms
of each module group go through `pallas_kernels.lora.lora_apply`, on the step's plan
(`lora_plans`, built once per step and read by every layer).
The layers are a Python loop over per-layer arrays (not a scan), so XLA
updates each layer's pool array in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import lora as lora_ops
from slora_jax.config import MODULES, EngineConfig, ModelConfig
from slora_jax.params import Params
from slora_jax.pool import Pool, PoolLayout, adapter_row_view


@struct.dataclass
class LoraBatch:
    """The adapter slots of a batch. S slots, M = len(MODULES)."""
    slot_pages: jax.Array   # [S, Pa] int32 pool pages of each slot's adapter
    slot_rank: jax.Array    # [S, M] int32, 0 = module not targeted
    slot_scale: jax.Array   # [S, M] float32
    slot_offset: jax.Array  # [S, M, 2] int32 row offsets of A^T and B


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a step function."""
    model: ModelConfig
    layout: PoolLayout
    lora_backend: str = "reference"
    attention_backend: str = "reference"
    logits: str = "none"          # "none" | "last" | "all" (prefill) logits returned
    # How the LoRA op cuts its work (defaults measured best: benchmarks/PERF.md)
    lora_tuning: lora_ops.TuningConfig = lora_ops.TuningConfig()

    @staticmethod
    def for_engine(mc: ModelConfig, layout: PoolLayout, ec: EngineConfig) -> "StepSpec":
        """The step spec of an engine: its backends."""
        return StepSpec(mc, layout, lora_backend=ec.lora_backend,
                        attention_backend=ec.attention_backend)

    def with_(self, **kw) -> "StepSpec":
        return dataclasses.replace(self, **kw)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def rope_inv_freq(mc: ModelConfig) -> jax.Array:
    d = mc.head_dim
    inv = 1.0 / (mc.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    rs = mc.rope_scaling
    if rs is None:
        return inv
    old = rs.original_max_position_embeddings
    low_wl, high_wl = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [T, heads, hd]; rotate-half convention (as HF Llama checkpoints expect)."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]          # [T, hd/2]
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def proj(x: jax.Array, w: jax.Array) -> jax.Array:
    """A weight projection, output in the activations' dtype (as HF's Linear gives it;
    the LoRA term is added to it in float32 and the sum rounded once more). A float32
    output cost 20-28% more at one row on the H100, where XLA then tiles the GEMM
    8x16 with 2 warps instead of 8x128 with 8 (benchmarks/results/small_gemm_*)."""
    return jnp.dot(x, w, preferred_element_type=x.dtype)


# The module groups whose modules read the same x: one `lora_apply` each per layer.
LORA_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


@struct.dataclass
class LoraPlans:
    """The step's LoRA plan: one `LoraPlan` per module group (`LORA_GROUPS`), None for a
    group no adapter may target. Built once per step (`lora_plans`), read by every layer."""
    qkv: lora_ops.LoraPlan | None
    o: lora_ops.LoraPlan | None
    gate_up: lora_ops.LoraPlan | None
    down: lora_ops.LoraPlan | None


def lora_plans(spec: StepSpec, lora: LoraBatch | None, token_slot: jax.Array | None,
               pool: Pool, *, prefill: bool = False,
               grouped: bool = False) -> LoraPlans | None:
    """The step's LoRA plan (None: no adapter slot in the batch, no LoRA work at all).
    token_slot: [T] each token's slot; `prefill`: the tokens are prompts (each request's
    a run), which picks the kernels' tiles; `grouped`: the caller ordered the tokens by
    slot (`sorts_tokens`), so the kernels' plan is grouped."""
    if lora is None or lora.slot_pages.shape[0] == 0:
        return None
    lay, s = spec.layout, lora.slot_pages.shape[0]
    rows_shape = adapter_row_view(pool.layers[0]).shape
    tokens = None
    if lora_ops.resolve_backend(spec.lora_backend) == "pallas":
        # Depends on token_slot alone: one for all module groups and layers.
        tokens = lora_ops.token_plan(token_slot, s, prefill=prefill, grouped=grouped,
                                     config=spec.lora_tuning)

    def group(modules):
        idx = [MODULES.index(m) for m in modules if m in lay.lora_modules]
        if not idx:
            return None                       # no adapter may target them
        ix = jnp.asarray(idx)
        return lora_ops.make_plan(
            token_slot, lora.slot_pages, lora.slot_offset[:, ix, 0], lora.slot_offset[:, ix, 1],
            lora.slot_rank[:, ix], lora.slot_scale[:, ix],
            widths=tuple(lay.module_shapes[i][1] for i in idx),
            k_in=lay.module_shapes[idx[0]][0], max_rank=lay.max_rank,
            page_size=lay.page_size, rows_shape=rows_shape, tokens=tokens)
    return LoraPlans(*(group(mods) for mods in LORA_GROUPS))


def _lora_terms(plans: LoraPlans | None, group: str, x: jax.Array, modules: tuple[str, ...],
                pool_layer: jax.Array, spec: StepSpec) -> tuple[jax.Array | float, ...]:
    """The LoRA terms of one module group's modules (0.0 for those no adapter targets)."""
    out: list[jax.Array | float] = [0.0] * len(modules)
    plan = None if plans is None else getattr(plans, group)
    if plan is None:
        return tuple(out)
    live = [j for j, m in enumerate(modules) if m in spec.layout.lora_modules]
    ys = lora_ops.lora_apply(x, adapter_row_view(pool_layer), plan, spec.lora_tuning)
    for j, y in zip(live, ys):
        out[j] = y
    return tuple(out)


Attend = Callable[[int, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def sorts_tokens(spec: StepSpec, lora: LoraBatch | None, num_tokens: int) -> bool:
    """Static: whether a decode step of `num_tokens` tokens orders its rows by slot
    once, before the layers (`step.decode`), and hands `lora_plans` grouped tokens:
    with the Pallas LoRA kernels, above `TuningConfig.unsorted_max_tokens` tokens."""
    if (lora is None or not lora.slot_pages.shape[0]
            or lora_ops.resolve_backend(spec.lora_backend) != "pallas"):
        return False
    return lora_ops.sorts_tokens(num_tokens, spec.lora_tuning)


def transformer(params: Params, pool: Pool, tokens: jax.Array, positions: jax.Array,
                attend: Attend, lora: LoraPlans | None,
                spec: StepSpec) -> tuple[Pool, jax.Array]:
    """tokens, positions: [T] -> (new pool, final hidden states [T, H]). `lora`: the
    step's LoRA plan (`lora_plans`) for these tokens."""
    mc = spec.model
    t = tokens.shape[0]
    dtype = params.embed.dtype
    inv_freq = rope_inv_freq(mc)
    x = params.embed[tokens]
    new_layers = []
    for li, (lp, pl) in enumerate(zip(params.layers, pool.layers)):
        h = rms_norm(x, lp.attn_norm, mc.rms_norm_eps)
        dq, dk, dv = _lora_terms(lora, "qkv", h, ("q", "k", "v"), pl, spec)
        q = (proj(h, lp.wq) + dq).astype(dtype)
        k = (proj(h, lp.wk) + dk).astype(dtype)
        v = (proj(h, lp.wv) + dv).astype(dtype)
        q = apply_rope(q.reshape(t, mc.num_heads, mc.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(t, mc.num_kv_heads, mc.head_dim), positions, inv_freq)
        v = v.reshape(t, mc.num_kv_heads, mc.head_dim)
        # The q/k/v LoRA terms read this layer's pool before attend() writes K/V
        # into it. Without this barrier XLA may schedule a read after the write
        # and then copies the whole pool array to keep the old value alive.
        q, k, v, pl = jax.lax.optimization_barrier((q, k, v, pl))
        pl, att = attend(li, pl, q, k, v)
        att = att.reshape(t, mc.q_size).astype(dtype)
        (do,) = _lora_terms(lora, "o", att, ("o",), pl, spec)
        x = (x.astype(jnp.float32) + proj(att, lp.wo) + do).astype(dtype)
        h = rms_norm(x, lp.mlp_norm, mc.rms_norm_eps)
        dg, du = _lora_terms(lora, "gate_up", h, ("gate", "up"), pl, spec)
        gate = proj(h, lp.w_gate) + dg
        up = proj(h, lp.w_up) + du
        act = (jax.nn.silu(gate.astype(dtype).astype(jnp.float32))
               * up.astype(dtype).astype(jnp.float32)).astype(dtype)
        (dd,) = _lora_terms(lora, "down", act, ("down",), pl, spec)
        x = (x.astype(jnp.float32) + proj(act, lp.w_down) + dd).astype(dtype)
        new_layers.append(pl)
    x = rms_norm(x, params.final_norm, mc.rms_norm_eps)
    return Pool(layers=tuple(new_layers)), x


def lm_logits(params: Params, h: jax.Array) -> jax.Array:
    """h: [N, H] -> logits [N, V] float32."""
    if params.lm_head is None:
        return jnp.einsum("nh,vh->nv", h, params.embed, preferred_element_type=jnp.float32)
    return _mm(h, params.lm_head)
