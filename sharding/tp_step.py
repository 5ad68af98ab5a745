"""S-LoRA tensor parallelism: `tp_prefill` and `tp_decode`, shard_map'd over the `tp` axis.

Same contract as `slora_jax.step`: `(params, pool, batch) -> (pool, out)`,
jitted, pool donated, batch replicated (the host builds it with
`slora_jax.batching` and the shard layout, see `TPSpec.layout`). Params are
placed by `sharding.specs.shard_params`, the pool by `specs.init_tp_pool`.

Inside the shard_map each device runs the Llama layers on its heads and its
F/N slice of the MLP, with the building blocks of `slora_jax.model`, the pool
helpers of `slora_jax.pool` and the dispatch points of `pallas_kernels`
applied to its own pool shard. Communication per layer, T tokens in the step
(T = b at decode), r = the batch's static max_rank (padded to a multiple of N):

* base model: one all-reduce of the `[T, H]` partial sums after o (attention
  block) and one after down (MLP): 2 x T·H per layer, float32;
* LoRA, only in steps whose batch has an adapter slot: an all-gather
  `[T, r/N] -> [T, r]` for each column-parallel module (q, k, v, gate, up)
  and an all-reduce of `[T, r]` for each row-parallel one (o, down). The
  row-parallel B output `[T, H/N]` is added into the device's own column block
  of the base partial sum, so the base all-reduce carries it (S-LoRA §5).
  Extra: about 7 x T·r per layer, r << H.

Embedding, final norm, LM head and sampling run replicated on every device
(the LM head is not split: see `sharding.specs`), so every device returns
the same tokens and logits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import lora as lora_ops
from pallas_kernels import paged_attention as attn_ops
from slora_jax.config import MODULES, ModelConfig
from slora_jax.model import (LoraBatch, StepSpec, proj, apply_rope, lm_logits, rms_norm,
                             rope_inv_freq)
from slora_jax.params import Params
from slora_jax.pool import Pool, PoolLayout, adapter_row_view, kv_location, write_kv
from slora_jax.sampling import sample
from slora_jax.step import DecodeBatch, PrefillBatch, StepOutput
from sharding.mesh import TP_AXIS
from sharding.specs import param_specs, pool_specs, shard_layout


@dataclasses.dataclass(frozen=True)
class TPSpec:
    """Everything static about a TP step. `layout` is ONE device's pool shard."""
    model: ModelConfig
    layout: PoolLayout
    mesh: Mesh
    lora_backend: str = "reference"
    attention_backend: str = "reference"
    logits: str = "none"          # as StepSpec.logits

    @staticmethod
    def create(spec: StepSpec, mesh: Mesh) -> "TPSpec":
        n = mesh.shape[TP_AXIS]
        # "auto" stays on the references under TP: the Pallas kernels have not been
        # checked on sharded pool widths on GPUs yet ("pallas" may still be asked for).
        fix = lambda b: "reference" if b == "auto" else b   # noqa: E731
        return TPSpec(spec.model, shard_layout(spec.model, spec.layout, n), mesh,
                      fix(spec.lora_backend), fix(spec.attention_backend), spec.logits)

    @property
    def n(self) -> int:
        return self.mesh.shape[TP_AXIS]

    def with_(self, **kw) -> "TPSpec":
        return dataclasses.replace(self, **kw)


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


class _TPLora:
    """S-LoRA's split of the LoRA term, on one device's pool shard."""

    def __init__(self, lora: LoraBatch, token_slot: jax.Array, spec: TPSpec):
        self.lora, self.token_slot, self.spec = lora, token_slot, spec
        self.active = lora.slot_pages.shape[0] > 0   # static: no slots, no LoRA work

    def column(self, x: jax.Array, module: str, pool_layer: jax.Array) -> jax.Array | float:
        """x: [T, in] (replicated) -> this device's [T, out/N] of s·x·A·B, float32.

        Shrink with this device's r/N rank rows of A, all-gather the [T, r/N]
        pieces into [T, r] (rank order, see `sharding.adapters`), expand with
        this device's out/N columns of B.
        """
        if not self.active or module not in self.spec.layout.lora_modules:
            return 0.0
        i, lb, lay, n = MODULES.index(module), self.lora, self.spec.layout, self.spec.n
        rows = adapter_row_view(pool_layer)
        rank = lb.slot_rank[:, i]
        xa = lora_ops.lora_shrink(x, rows, lb.slot_pages, lb.slot_offset[:, i, 0], rank // n,
                                  self.token_slot, max_rank=lay.max_rank // n,
                                  page_size=lay.page_size, backend=self.spec.lora_backend)
        xa = jax.lax.all_gather(xa, TP_AXIS, axis=2)                  # [T, r/N, N]
        xa = xa.reshape(xa.shape[0], -1)                              # [T, r]: row i*N+d
        return lora_ops.lora_expand(xa, rows, lb.slot_pages, lb.slot_offset[:, i, 1], rank,
                                    lb.slot_scale[:, i], self.token_slot,
                                    out_features=lay.module_shapes[i][1],
                                    page_size=lay.page_size, backend=self.spec.lora_backend)

    def row_reduce(self, partial: jax.Array, x: jax.Array, module: str,
                   pool_layer: jax.Array) -> jax.Array:
        """The all-reduce of a row-parallel block, carrying its LoRA term.

        partial: [T, H] float32, this device's partial sum x·W[in/N rows];
        x: [T, in/N]. Returns the full x·W + s·x·A·B [T, H], replicated.
        """
        if self.active and module in self.spec.layout.lora_modules:
            i, lb, lay = MODULES.index(module), self.lora, self.spec.layout
            rows = adapter_row_view(pool_layer)
            rank = lb.slot_rank[:, i]
            xa = lora_ops.lora_shrink(x, rows, lb.slot_pages, lb.slot_offset[:, i, 0], rank,
                                      self.token_slot, max_rank=lay.max_rank,
                                      page_size=lay.page_size, backend=self.spec.lora_backend)
            xa = jax.lax.psum(xa, TP_AXIS)                            # [T, r]
            y = lora_ops.lora_expand(xa, rows, lb.slot_pages, lb.slot_offset[:, i, 1], rank,
                                     lb.slot_scale[:, i], self.token_slot,
                                     out_features=lay.module_shapes[i][1],
                                     page_size=lay.page_size,
                                     backend=self.spec.lora_backend)  # [T, H/N]
            w = y.shape[1]
            start = jax.lax.axis_index(TP_AXIS) * w
            mine = jax.lax.dynamic_slice_in_dim(partial, start, w, axis=1)
            partial = jax.lax.dynamic_update_slice_in_dim(partial, mine + y, start, axis=1)
        return jax.lax.psum(partial, TP_AXIS)


def tp_transformer(params: Params, pool: Pool, tokens: jax.Array, positions: jax.Array,
                   attend, lora: LoraBatch, token_slot: jax.Array,
                   spec: TPSpec) -> tuple[Pool, jax.Array]:
    """`model.transformer` on one device's shards (inside shard_map).

    tokens, positions: [T] -> (new pool shard, final hidden states [T, H], replicated).
    attend(li, pool_layer_shard, q [T, nh/N, hd], k, v [T, nkv/N, hd]).
    """
    mc, n = spec.model, spec.n
    t, hd = tokens.shape[0], mc.head_dim
    nq, nkv = mc.num_heads // n, mc.num_kv_heads // n
    dtype = params.embed.dtype
    inv_freq = rope_inv_freq(mc)
    lo = _TPLora(lora, token_slot, spec)
    x = params.embed[tokens]
    new_layers = []
    for li, (lp, pl) in enumerate(zip(params.layers, pool.layers)):
        h = rms_norm(x, lp.attn_norm, mc.rms_norm_eps)
        q = (proj(h, lp.wq) + lo.column(h, "q", pl)).astype(dtype)
        k = (proj(h, lp.wk) + lo.column(h, "k", pl)).astype(dtype)
        v = (proj(h, lp.wv) + lo.column(h, "v", pl)).astype(dtype)
        q = apply_rope(q.reshape(t, nq, hd), positions, inv_freq)
        k = apply_rope(k.reshape(t, nkv, hd), positions, inv_freq)
        v = v.reshape(t, nkv, hd)
        # As in model.transformer: the LoRA reads of this pool layer happen
        # before attend() writes K/V into it, or XLA copies the pool shard.
        q, k, v, pl = jax.lax.optimization_barrier((q, k, v, pl))
        pl, att = attend(li, pl, q, k, v)
        att = att.reshape(t, nq * hd).astype(dtype)
        # Row-parallel partial sums stay float32 until the all-reduce has summed them;
        # the column-parallel projections round as the one-device step's do (`proj`).
        x = (x.astype(jnp.float32) + lo.row_reduce(_mm(att, lp.wo), att, "o", pl)).astype(dtype)
        h = rms_norm(x, lp.mlp_norm, mc.rms_norm_eps)
        gate = proj(h, lp.w_gate) + lo.column(h, "gate", pl)
        up = proj(h, lp.w_up) + lo.column(h, "up", pl)
        act = (jax.nn.silu(gate.astype(dtype).astype(jnp.float32))
               * up.astype(dtype).astype(jnp.float32)).astype(dtype)
        x = (x.astype(jnp.float32) + lo.row_reduce(_mm(act, lp.w_down), act, "down", pl)
             ).astype(dtype)
        new_layers.append(pl)
    x = rms_norm(x, params.final_norm, mc.rms_norm_eps)
    return Pool(layers=tuple(new_layers)), x


def _shard_mapped(body, params: Params, spec: TPSpec):
    pools = pool_specs(spec.layout.num_layers)
    return jax.shard_map(body, mesh=spec.mesh, in_specs=(param_specs(params), pools, P()),
                         out_specs=(pools, P()))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("pool",))
def tp_prefill(params: Params, pool: Pool, batch: PrefillBatch, *, spec: TPSpec):
    """`step.prefill` over N devices. batch: built with `spec.layout` (replicated)."""
    mc, layout = spec.model, spec.layout

    def body(params, pool, batch):
        r = batch.kv_pages.shape[0]
        valid = batch.seq_ids < r
        seq = jnp.minimum(batch.seq_ids, r - 1)
        page, slot = kv_location(batch.kv_pages[seq], batch.positions, layout)
        page = jnp.where(valid, page, 0)
        token_slot = jnp.where(valid, batch.req_slot[seq], -1)

        def attend(li, pl, q, k, v):
            pl = write_kv(pl, k, v, page, slot, layout)
            out = attn_ops.prefill_attention(q, k, v, batch.seq_ids, batch.positions,
                                             mc.sliding_window, backend=spec.attention_backend)
            return pl, out

        pool, h = tp_transformer(params, pool, batch.tokens, batch.positions, attend,
                                 batch.lora, token_slot, spec)
        logits = lm_logits(params, h[batch.last_index])
        tokens, logprobs = sample(logits, batch.sampling,
                                  batch.positions[batch.last_index] + 1)
        extra = {"none": None, "last": logits, "all": None}[spec.logits]
        if spec.logits == "all":
            extra = lm_logits(params, h)
        return pool, StepOutput(tokens=tokens, logprobs=logprobs, logits=extra)

    return _shard_mapped(body, params, spec)(params, pool, batch)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("pool",))
def tp_decode(params: Params, pool: Pool, batch: DecodeBatch, *, spec: TPSpec):
    """`step.decode` over N devices. batch: built with `spec.layout` (replicated)."""
    mc, layout = spec.model, spec.layout

    def body(params, pool, batch):
        page, slot = kv_location(batch.kv_pages, batch.positions, layout)
        lengths = batch.positions + 1

        def attend(li, pl, q, k, v):
            pl = write_kv(pl, k, v, page, slot, layout)
            out = attn_ops.decode_attention(q, pl, batch.kv_pages, lengths, layout,
                                            mc.sliding_window, backend=spec.attention_backend)
            return pl, out

        pool, h = tp_transformer(params, pool, batch.tokens, batch.positions, attend,
                                 batch.lora, batch.req_slot, spec)
        logits = lm_logits(params, h)
        tokens, logprobs = sample(logits, batch.sampling, lengths)
        return pool, StepOutput(tokens=tokens, logprobs=logprobs,
                                logits=None if spec.logits == "none" else logits)

    return _shard_mapped(body, params, spec)(params, pool, batch)
