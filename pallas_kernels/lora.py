"""Heterogeneous-batch LoRA over the unified pool: the op the model calls.

`lora_apply(x, rows, plan, config)` gives the LoRA terms s·(x·A)·B of a group of modules
that read the same x (q/k/v, gate/up, o, down), each token with its own slot's adapter.
`plan` (`LoraPlan`) holds everything that does not depend on the layer: the slot tables
and, for the Pallas kernels (`lora_mgpu`), their work plan (`lora_plan`), built once per
step (`token_plan`, then `make_plan` per module group) and read by every layer. Its
specification is `lora_reference` (S-LoRA's MBGMM at prefill, MBGMV at decode), which a
plan without a packing runs. `lora_shrink` and `lora_expand` are the op's two halves,
for a caller that runs something between them (the TP step's collectives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import lora_mgpu
from pallas_kernels.lora_mgpu import TuningConfig
from pallas_kernels.lora_plan import (GroupPlan, TokenPlan, group_plan, pick_block_tokens,
                                      plan_tokens, slot_order)
from pallas_kernels.lora_reference import (lora_apply_reference, lora_expand_reference,
                                           lora_shrink_reference)

__all__ = ["BACKENDS", "LoraPlan", "TuningConfig", "lora_apply", "lora_expand", "lora_shrink",
           "make_plan", "resolve_backend", "slot_order", "sorts_tokens", "token_plan"]

BACKENDS = ("auto", "reference", "pallas")
DEFAULT_CONFIG = TuningConfig()


def resolve_backend(backend: str) -> str:
    """"auto": the Pallas kernels on a GPU, the jnp reference elsewhere."""
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA backend '{backend}' (have {BACKENDS})")
    return backend


@struct.dataclass
class LoraPlan:
    """One module group's LoRA work in a step, for every layer: M modules, S slots."""
    token_slot: jax.Array            # [T] int32 each token's slot, -1: no adapter
    slot_pages: jax.Array            # [S, Pa] int32 pool pages of each slot's adapter
    a_offsets: jax.Array | None      # [S, M] int32 row offset of each A^T (None: no shrink)
    b_offsets: jax.Array | None      # [S, M] int32 row offset of each B (None: no expand)
    ranks: jax.Array                 # [S, M] int32, 0: the slot does not target the module
    scales: jax.Array                # [S, M] float32
    kernel: GroupPlan | None         # the Pallas kernels' packing; None: the reference
    widths: tuple[int, ...] = struct.field(pytree_node=False)   # M output widths
    max_rank: int = struct.field(pytree_node=False)
    page_size: int = struct.field(pytree_node=False)


def sorts_tokens(num_tokens: int, config: TuningConfig = DEFAULT_CONFIG) -> bool:
    """Whether a decode step of `num_tokens` tokens orders them by slot before the
    layers (`slot_order`), so that its plan is grouped: above
    `config.unsorted_max_tokens`. A prefill step never does: a prompt is one run."""
    return num_tokens > config.unsorted_max_tokens


def token_plan(token_slot: jax.Array, num_slots: int, *, prefill: bool = False,
               grouped: bool = False, config: TuningConfig = DEFAULT_CONFIG) -> TokenPlan:
    """The kernels' token plan of a step, shared by its module groups. token_slot: [T]
    int32; `grouped`: the caller ordered the tokens by slot (`sorts_tokens`)."""
    cap = config.prefill_block_tokens if prefill else config.decode_block_tokens
    bt = pick_block_tokens(token_slot.shape[0], num_slots, cap)
    return plan_tokens(token_slot, num_slots, bt, grouped=grouped)


def make_plan(token_slot: jax.Array, slot_pages: jax.Array, a_offsets: jax.Array | None,
              b_offsets: jax.Array | None, ranks: jax.Array, scales: jax.Array, *,
              widths: tuple[int, ...], k_in: int | None, max_rank: int, page_size: int,
              rows_shape: tuple[int, int], tokens: TokenPlan | None = None) -> LoraPlan:
    """The plan of one module group. Tables as `LoraPlan`'s; k_in: the width of x (None:
    expand only), widths: the modules' output widths (() : shrink only); rows_shape: the
    pool rows' [N, H]. `tokens` (`token_plan`): build the Pallas kernels' packing on
    it; None: the plan runs the jnp reference."""
    kernel = None
    if tokens is not None:
        kernel = group_plan(tokens, slot_pages, a_offsets, b_offsets, ranks, scales,
                            k_in=k_in, widths=tuple(widths), h=rows_shape[1],
                            page_size=page_size, max_rank=max_rank, num_rows=rows_shape[0])
    return LoraPlan(token_slot=token_slot, slot_pages=slot_pages, a_offsets=a_offsets,
                    b_offsets=b_offsets, ranks=ranks, scales=scales, kernel=kernel,
                    widths=tuple(widths), max_rank=max_rank, page_size=page_size)


def _kernels_serve(plan: LoraPlan, rows, config: TuningConfig) -> bool:
    """Whether the plan runs the kernels: it has a packing, and they serve its widths
    (if not, the reference runs, and the log says so once)."""
    if plan.kernel is None:
        return False
    why = lora_mgpu.why_not(plan.kernel, rows, plan.page_size, config)
    if why:
        lora_mgpu.warn_fallback(why)
    return why is None


def lora_apply(x: jax.Array, rows: jax.Array, plan: LoraPlan,
               config: TuningConfig = DEFAULT_CONFIG, *, interpret=None) -> tuple[jax.Array, ...]:
    """The LoRA terms of the plan's M modules, which read the same x [T, in]: M arrays
    [T, out_m] float32, s·(x·A)·B of each token's slot (0 for tokens without adapter).
    rows: the layer's pool rows [N, H]. `interpret`: the Mosaic GPU interpreter's
    parameters (default: on when there is no GPU)."""
    if _kernels_serve(plan, rows, config):
        return lora_mgpu.lora_apply(x, rows, plan.kernel, config, interpret=interpret)
    return tuple(lora_apply_reference(
        x, rows, plan.slot_pages, plan.a_offsets[:, j], plan.b_offsets[:, j], plan.ranks[:, j],
        plan.scales[:, j], plan.token_slot, max_rank=plan.max_rank, out_features=w,
        page_size=plan.page_size) for j, w in enumerate(plan.widths))


def _module_plan(token_slot, slot_pages, a_offset, b_offset, rank, scale, *, width, k_in,
                 max_rank, page_size, rows, backend, config) -> LoraPlan:
    """The plan of one module, tokens unsorted (the halves' callers pass none)."""
    col = lambda a: None if a is None else a[:, None]        # noqa: E731
    tokens = None
    if resolve_backend(backend) == "pallas":
        tokens = token_plan(token_slot, slot_pages.shape[0], config=config)
    return make_plan(token_slot, slot_pages, col(a_offset), col(b_offset), rank[:, None],
                     col(scale), widths=() if width is None else (width,), k_in=k_in,
                     max_rank=max_rank, page_size=page_size, rows_shape=rows.shape,
                     tokens=tokens)


def lora_shrink(x: jax.Array, rows: jax.Array, slot_pages: jax.Array, a_offset: jax.Array,
                rank: jax.Array, token_slot: jax.Array, *, max_rank: int, page_size: int,
                backend: str = "reference", config: TuningConfig = DEFAULT_CONFIG,
                interpret=None) -> jax.Array:
    """The first half of one module's `lora_apply`: xa = x·A per token, [T, in] ->
    [T, max_rank] float32 (`lora_shrink_reference`)."""
    plan = _module_plan(token_slot, slot_pages, a_offset, None, rank, jnp.ones_like(
        rank, jnp.float32), width=None, k_in=x.shape[1], max_rank=max_rank,
        page_size=page_size, rows=rows, backend=backend, config=config)
    if _kernels_serve(plan, rows, config):
        return lora_mgpu.lora_shrink(x, rows, plan.kernel, config, interpret=interpret)[0]
    return lora_shrink_reference(x, rows, slot_pages, a_offset, rank, token_slot,
                                 max_rank=max_rank, page_size=page_size)


def lora_expand(xa: jax.Array, rows: jax.Array, slot_pages: jax.Array, b_offset: jax.Array,
                rank: jax.Array, scale: jax.Array, token_slot: jax.Array, *,
                out_features: int, page_size: int, backend: str = "reference",
                config: TuningConfig = DEFAULT_CONFIG, interpret=None) -> jax.Array:
    """The second half of one module's `lora_apply`: y = scale·xa·B per token, xa
    [T, R] float32 -> [T, out_features] float32 (`lora_expand_reference`)."""
    plan = _module_plan(token_slot, slot_pages, None, b_offset, rank, scale,
                        width=out_features, k_in=None, max_rank=xa.shape[1],
                        page_size=page_size, rows=rows, backend=backend, config=config)
    if _kernels_serve(plan, rows, config):
        return lora_mgpu.lora_expand(xa[None], rows, plan.kernel, config,
                                     interpret=interpret)[0]
    return lora_expand_reference(xa, rows, slot_pages, b_offset, rank, scale, token_slot,
                                 out_features=out_features, page_size=page_size)
