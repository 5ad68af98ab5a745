"""Partition specs of S-LoRA tensor parallelism: one table of rules, MaxText style.

Every array the step reads has logical axis names (`LOGICAL_AXES`); `RULES`
maps logical axes to mesh axes. A different parallel layout is a change of
`RULES`, not of model code. With the rules below (Megatron as S-LoRA uses it):

* q/k/v, gate/up are column-parallel (output features split): device d holds
  heads `[d*nh/N, (d+1)*nh/N)` and KV heads `[d*nkv/N, ...)`, so GQA groups
  stay on one device;
* o and down are row-parallel (input features split); each leaves a partial
  sum of the residual update, reduced by one all-reduce per block;
* embeddings, norms and the LM head are replicated (vocabularies such as
  32000 split evenly, but the head is one matmul per step and its replication
  keeps the sampled token on every device without a gather);
* the pool is split along its row-width axis: every layer's `[num_pages,
  page_size, H]` array becomes N shards `[num_pages, page_size, H/N]`. Each
  shard is a complete pool of its own (`shard_layout`): its KV pages hold the
  device's KV heads (same `tokens_per_page`, so one page id means the same
  tokens on every device) and its adapter pages the device's adapter shards
  (`sharding.adapters`). The host allocator hands out one page id for all
  devices, as on one device.

Whether a LoRA target module is column- or row-parallel is read off the same
table (`module_parallelism`), so the adapter shards always follow the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slora_jax.config import MODULES, ConfigError, ModelConfig, round_up
from slora_jax.params import LayerParams, Params
from slora_jax.pool import Pool, PoolLayout
from sharding.mesh import TP_AXIS

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "vocab": None,
    "hidden": None,
    "norm": None,
    "q_heads": TP_AXIS,      # nh*hd, split by whole heads
    "kv_heads": TP_AXIS,     # nkv*hd, split by whole KV heads
    "mlp": TP_AXIS,          # F
    "pages": None,
    "page_rows": None,
    "pool_width": TP_AXIS,   # H: each device's pool shard is H/N wide
}

# Array (Params / LayerParams field, or "pool" for a pool layer) -> logical axes.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "hidden"),
    "final_norm": ("norm",),
    "lm_head": ("hidden", "vocab"),
    "attn_norm": ("norm",),
    "mlp_norm": ("norm",),
    "wq": ("hidden", "q_heads"),
    "wk": ("hidden", "kv_heads"),
    "wv": ("hidden", "kv_heads"),
    "wo": ("q_heads", "hidden"),
    "w_gate": ("hidden", "mlp"),
    "w_up": ("hidden", "mlp"),
    "w_down": ("mlp", "hidden"),
    "pool": ("pages", "page_rows", "pool_width"),
}

# The base weight each LoRA target module adds to.
MODULE_WEIGHT: dict[str, str] = {"q": "wq", "k": "wk", "v": "wv", "o": "wo",
                                 "gate": "w_gate", "up": "w_up", "down": "w_down"}


def spec_of(name: str) -> P:
    return P(*(RULES[a] for a in LOGICAL_AXES[name]))


def module_parallelism(module: str) -> str:
    """"column" (output features split) or "row" (input features split), from the table."""
    fin, fout = (RULES[a] for a in LOGICAL_AXES[MODULE_WEIGHT[module]])
    if fout is not None and fin is None:
        return "column"
    if fin is not None and fout is None:
        return "row"
    raise ValueError(f"module {module}: the rules split neither or both of its axes")


COLUMN_MODULES = tuple(m for m in MODULES if module_parallelism(m) == "column")
ROW_MODULES = tuple(m for m in MODULES if module_parallelism(m) == "row")


def param_specs(params: Params) -> Params:
    """A Params-shaped pytree of PartitionSpecs (None where params has None)."""
    layer = LayerParams(**{f: spec_of(f) for f in LayerParams.__dataclass_fields__})
    return Params(embed=spec_of("embed"), layers=tuple(layer for _ in params.layers),
                  final_norm=spec_of("final_norm"),
                  lm_head=None if params.lm_head is None else spec_of("lm_head"))


def pool_specs(num_layers: int) -> Pool:
    return Pool(layers=tuple(spec_of("pool") for _ in range(num_layers)))


def named(mesh: Mesh, specs):
    """PartitionSpec pytree -> NamedSharding pytree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def check_tp(mc: ModelConfig, n: int) -> None:
    """Raise ConfigError unless every split axis divides by n."""
    sizes = {"num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads,
             "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size}
    for field, size in sizes.items():
        if size % n:
            raise ConfigError(f"{mc.name}: {field}={size} does not split over "
                              f"tensor-parallel size {n}")


def shard_layout(mc: ModelConfig, layout: PoolLayout, n: int) -> PoolLayout:
    """The layout of one device's pool shard `[num_pages, page_size, H/N]`.

    KV: n_kv/N heads per device; `tokens_per_page` equals the global one
    (both terms of `page_size*H // (2*kv_size)` divide by N), so the host
    allocates KV pages exactly as for one device. Adapters: each module's
    shard stream holds `r*in/N` elements of A and `r*out/N` of B (the
    column-parallel A shard is `[r/N, in]`, the same count), hence
    `module_shapes = (in/N, out/N)`; `max_rank` is rounded up to a multiple of
    N (column-parallel A is split along the rank).
    """
    check_tp(mc, n)
    return PoolLayout(
        num_layers=layout.num_layers, num_pages=layout.num_pages, page_size=layout.page_size,
        row_width=layout.row_width // n, num_kv_heads=layout.num_kv_heads // n,
        head_dim=layout.head_dim, max_rank=round_up(layout.max_rank, n),
        module_shapes=tuple((fin // n, fout // n) for fin, fout in layout.module_shapes),
        lora_modules=layout.lora_modules)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """Place params on the mesh by the table (each device gets its slices)."""
    return jax.device_put(params, named(mesh, param_specs(params)))


def init_tp_pool(layout: PoolLayout, mesh: Mesh, dtype=jnp.bfloat16) -> Pool:
    """A zeroed pool of global shape `[num_pages, page_size, H]` per layer, each
    device holding its `[num_pages, page_size, H/N]` shard; created sharded.

    layout: the global (single-device) layout.
    """
    shape = (layout.num_pages, layout.page_size, layout.row_width)
    out = named(mesh, pool_specs(layout.num_layers))
    make = jax.jit(lambda: Pool(layers=tuple(jnp.zeros(shape, dtype)
                                             for _ in range(layout.num_layers))),
                   out_shardings=out)
    return make()
