"""The Llama transformer over the unified pool, with heterogeneous-batch LoRA.

`transformer()` runs the layers on a flat token array. It knows nothing of
prefill or decode: the caller passes `attend(layer_index, pool_layer, q, k, v)`,
which writes K/V into the pool and returns the attention output. The LoRA term
of every targeted module goes through `pallas_kernels.lora`'s dispatch points.
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
from slora_jax.config import LORA_PLAN_OPTIONS, MODULES, EngineConfig, ModelConfig
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
    # Pallas LoRA plan options (`EngineConfig` says what each does; defaults measured best)
    lora_sort: str = "auto"       # sort tokens by slot: "always" | "never" | "auto"
    lora_out: str = "float32"     # expand output dtype: "float32" | "pool"
    lora_max_tile: int | None = None  # most tokens per tile (None: 64 prefill, 32 decode)
    lora_shrink: str = "balanced"  # shrink blocks: "balanced" | "tile"

    @staticmethod
    def for_engine(mc: ModelConfig, layout: PoolLayout, ec: EngineConfig) -> "StepSpec":
        """The step spec of an engine: its backends and LoRA plan options."""
        return StepSpec(mc, layout, lora_backend=ec.lora_backend,
                        attention_backend=ec.attention_backend,
                        **{k: getattr(ec, k) for k in LORA_PLAN_OPTIONS})

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


class _Lora:
    """Per-step LoRA context: which slot each token uses, and the slot tables."""

    def __init__(self, lora: LoraBatch | None, token_slot: jax.Array | None, spec: StepSpec,
                 prefill: bool = False, grouped: bool = False):
        self.lora, self.token_slot, self.spec = lora, token_slot, spec
        self.plan = self.block_tokens = None
        self.group_plans: dict = {}     # Pallas: each module group's packing, built once
        if (lora is not None and lora.slot_pages.shape[0]
                and lora_ops.resolve_backend(spec.lora_backend) == "pallas"):
            # The kernels' token plan depends on token_slot alone: build it once for
            # all modules and layers.
            from pallas_kernels import lora_plan
            t, s = token_slot.shape[0], lora.slot_pages.shape[0]
            self.block_tokens, sort = lora_plan.step_policy(
                t, s, spec.lora_sort, spec.lora_max_tile, prefill)
            if sort and grouped:
                sort = "grouped"    # the caller sorted the tokens: no gathers per layer
            self.plan = lora_plan.plan_batch(token_slot, s, self.block_tokens, sort=sort)

    def delta(self, x: jax.Array, module: str, pool_layer: jax.Array) -> jax.Array | float:
        return self.deltas(x, (module,), pool_layer)[0]

    def deltas(self, x: jax.Array, modules: tuple[str, ...],
               pool_layer: jax.Array) -> tuple[jax.Array | float, ...]:
        """LoRA terms of modules that read the same x (q/k/v, gate/up): one dispatch, so
        the Pallas backend runs one shrink and one expand per width for all of them."""
        out: list[jax.Array | float] = [0.0] * len(modules)
        lb, lay = self.lora, self.spec.layout
        if lb is None or lb.slot_pages.shape[0] == 0:
            return tuple(out)     # no adapter in the batch: no LoRA work at all
        live = [j for j, m in enumerate(modules) if m in lay.lora_modules]
        if not live:
            return tuple(out)     # no adapter may target them
        idx = jnp.asarray([MODULES.index(modules[j]) for j in live])
        rows = adapter_row_view(pool_layer)
        a_off, b_off = lb.slot_offset[:, idx, 0], lb.slot_offset[:, idx, 1]
        ranks, scales = lb.slot_rank[:, idx], lb.slot_scale[:, idx]
        widths = tuple(lay.module_shapes[MODULES.index(modules[j])][1] for j in live)
        plan = self.plan
        if plan is not None:
            # The packing depends on the step's slots, not on the layer: build it in
            # the first layer and let every later layer reuse it.
            from pallas_kernels import lora_plan
            key = tuple(modules[j] for j in live)
            if key not in self.group_plans:
                self.group_plans[key] = lora_plan.make_group_plan(
                    self.token_slot, rows, lb.slot_pages, a_off, b_off, ranks, scales,
                    k_in=x.shape[1], widths=widths, max_rank=lay.max_rank,
                    page_size=lay.page_size, plan=plan, block_tokens=self.block_tokens,
                    balanced=self.spec.lora_shrink == "balanced")
            plan = self.group_plans[key]
        ys = lora_ops.lora_apply_modules(
            x, rows, lb.slot_pages, a_off, b_off, ranks, scales, self.token_slot,
            max_rank=lay.max_rank, out_features=widths, page_size=lay.page_size,
            backend=self.spec.lora_backend, plan=plan, out=self.spec.lora_out)
        for j, y in zip(live, ys):
            out[j] = y
        return tuple(out)


Attend = Callable[[int, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def sorts_tokens(spec: StepSpec, lora: LoraBatch | None, num_tokens: int,
                 prefill: bool = False) -> bool:
    """Static: whether the step's Pallas LoRA plan sorts its tokens by slot
    (`lora_plan.step_policy`). The decode step then sorts its rows once (`step.decode`)
    and passes `grouped=True`, instead of every layer sorting x and un-sorting its terms."""
    if (lora is None or not lora.slot_pages.shape[0]
            or lora_ops.resolve_backend(spec.lora_backend) != "pallas"):
        return False
    from pallas_kernels import lora_plan
    return bool(lora_plan.step_policy(num_tokens, lora.slot_pages.shape[0], spec.lora_sort,
                                      spec.lora_max_tile, prefill)[1])


def transformer(params: Params, pool: Pool, tokens: jax.Array, positions: jax.Array,
                attend: Attend, lora: LoraBatch | None, token_slot: jax.Array | None,
                spec: StepSpec, prefill: bool = False,
                grouped: bool = False) -> tuple[Pool, jax.Array]:
    """tokens, positions: [T] -> (new pool, final hidden states [T, H]). `prefill`: the
    tokens are prompts (each request's a run), which picks the LoRA plan's tiles.
    `grouped`: the caller ordered the tokens by slot (slots ascending, no-adapter tokens
    last), so a sorting LoRA plan need not (`sorts_tokens`)."""
    mc = spec.model
    t = tokens.shape[0]
    dtype = params.embed.dtype
    inv_freq = rope_inv_freq(mc)
    lo = _Lora(lora, token_slot, spec, prefill, grouped)
    x = params.embed[tokens]
    new_layers = []
    for li, (lp, pl) in enumerate(zip(params.layers, pool.layers)):
        h = rms_norm(x, lp.attn_norm, mc.rms_norm_eps)
        dq, dk, dv = lo.deltas(h, ("q", "k", "v"), pl)
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
        x = (x.astype(jnp.float32) + proj(att, lp.wo) + lo.delta(att, "o", pl)).astype(dtype)
        h = rms_norm(x, lp.mlp_norm, mc.rms_norm_eps)
        dg, du = lo.deltas(h, ("gate", "up"), pl)
        gate = proj(h, lp.w_gate) + dg
        up = proj(h, lp.w_up) + du
        act = (jax.nn.silu(gate.astype(dtype).astype(jnp.float32))
               * up.astype(dtype).astype(jnp.float32)).astype(dtype)
        x = (x.astype(jnp.float32) + proj(act, lp.w_down) + lo.delta(act, "down", pl)).astype(dtype)
        new_layers.append(pl)
    x = rms_norm(x, params.final_norm, mc.rms_norm_eps)
    return Pool(layers=tuple(new_layers)), x


def lm_logits(params: Params, h: jax.Array) -> jax.Array:
    """h: [N, H] -> logits [N, V] float32."""
    if params.lm_head is None:
        return jnp.einsum("nh,vh->nv", h, params.embed, preferred_element_type=jnp.float32)
    return _mm(h, params.lm_head)
