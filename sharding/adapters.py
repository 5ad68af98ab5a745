"""Host side of S-LoRA TP adapters: split a `LoraAdapter` into per-device row streams.

Each device's pool shard (`sharding.specs.shard_layout`, rows of width W =
H/N) holds that device's part of every resident adapter, laid out exactly as
`slora_jax.pool` lays out a whole adapter (per module, in `MODULES` order,
the A^T part then the B part, flattened row-major into W-wide rows). All
devices' streams have the same length, so an adapter takes the same page ids
on every device and the batch tables (`model.LoraBatch`) are shared.

The split follows S-LoRA (§5) and the base model's table:

* column-parallel module (q, k, v, gate, up; W_in = H, W_out = F):
  A is split along the rank and B along the output features. The rank is
  padded up to r' = round_up(r, N) with zero rows of A^T and of B (x·A·B is
  unchanged; this costs at most N-1 rank rows). Device d holds the A^T rows
  {d, d+N, d+2N, ...} (`[r'/N, H]`, interleaved, not a contiguous block: the
  all-gather of the `[T, r'/N]` partial products along a new minor axis then
  yields x·A in natural rank order, so B needs no permutation) and
  B[:, d*F/N:(d+1)*F/N] (`[r', F/N]`).
* row-parallel module (o, down; input already split): device d holds
  A^T[:, d*in/N:(d+1)*in/N] (`[r, in/N]`) and B[:, d*H/N:(d+1)*H/N]
  (`[r, H/N]`).

The slot tables keep `model.LoraBatch`'s format: `slot_rank` holds r' for
column modules (the device uses r'/N rows of A and r' rows of B) and r for row
modules; `slot_offset` are row offsets in the shard stream.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from slora_jax.adapters import LoraAdapter
from slora_jax.config import MODULES, round_up
from slora_jax.pool import Pool, PoolLayout, load_adapter_pages, pack_adapter_rows
from sharding.mesh import TP_AXIS
from sharding.specs import COLUMN_MODULES, pool_specs


def tp_ranks(ranks: dict[str, int], n: int) -> dict[str, int]:
    """The rank each module is packed with: column-parallel ranks padded to a multiple of n."""
    return {m: round_up(r, n) if m in COLUMN_MODULES else r for m, r in ranks.items()}


def shard_adapter(adapter: LoraAdapter, n: int) -> list[list[dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Per-device weights: out[d][layer][module] = (A^T shard, B shard)."""
    out: list[list[dict]] = [[{} for _ in adapter.weights] for _ in range(n)]
    for li, mods in enumerate(adapter.weights):
        for m, (a_t, b) in mods.items():
            r = a_t.shape[0]
            if m in COLUMN_MODULES:
                rp = round_up(r, n)
                a_t = np.pad(a_t, ((0, rp - r), (0, 0)))
                b = np.pad(b, ((0, rp - r), (0, 0)))
                w = b.shape[1] // n
                for d in range(n):
                    out[d][li][m] = (a_t[d::n], b[:, d * w:(d + 1) * w])
            else:
                wa, wb = a_t.shape[1] // n, b.shape[1] // n
                for d in range(n):
                    out[d][li][m] = (a_t[:, d * wa:(d + 1) * wa], b[:, d * wb:(d + 1) * wb])
    return out


def pack_tp_adapter(adapter: LoraAdapter, shard: PoolLayout, n: int, dtype=np.float32):
    """Pool rows and slot tables of an adapter for an N-way sharded pool.

    shard: one device's layout (`specs.shard_layout`). Returns, like
    `LoraAdapter.pack`, (rows [L, n_pages, page_size, N*W] with device d's
    stream in columns [d*W, (d+1)*W), rank [M], scale [M], offset [M, 2]).
    The rows array placed with `P(None, None, None, "tp")` gives each device
    its own stream; `tp_load_adapter_pages` does that.
    """
    ranks = tp_ranks(adapter.ranks, n)
    streams = [pack_adapter_rows(w, ranks, shard, dtype) for w in shard_adapter(adapter, n)]
    rows = np.concatenate(streams, axis=-1)
    offsets, _ = shard.adapter_offsets(ranks)
    rank = np.array([ranks.get(m, 0) for m in MODULES], np.int32)
    scale = np.array([adapter.scales.get(m, 0.0) for m in MODULES], np.float32)
    return rows, rank, scale, offsets


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("pool",))
def tp_load_adapter_pages(pool: Pool, pages: jax.Array, rows: jax.Array, *, mesh: Mesh) -> Pool:
    """Copy an adapter's rows into its pages on every device (each its own stream).

    pool: sharded as `specs.pool_specs`; pages: [n] int32; rows: [L, n, page_size, H]
    from `pack_tp_adapter`.
    """
    specs = pool_specs(len(pool.layers))
    return jax.shard_map(load_adapter_pages, mesh=mesh,
                         in_specs=(specs, P(), P(None, None, None, TP_AXIS)),
                         out_specs=specs)(pool, pages, rows)
