"""The unified paged pool (S-LoRA's Unified Paging) and its page geometry.

One array per layer, `[num_pages, page_size, H]`: a page is `page_size` rows of
the hidden size H. The same page index is used in every layer, so one page id
names one slice of memory across the model, as in S-LoRA. Two kinds of tenant
share the pages:

* KV cache. A KV page holds `tokens_per_page = page_size*H // (2*kv_size)`
  tokens, laid out K block then V block: the page's first
  `2*tokens_per_page*kv_size` elements viewed as `[2, tokens_per_page, n_kv, hd]`.
  For GQA (kv_size < H) a page simply holds more tokens, so no row is padded.
* LoRA weights. An adapter's weights for one layer form a stream of H-wide
  rows: for each targeted module, in `MODULES` order, A^T `[r, in]` and then B
  `[r, out]`. Row j of the stream lives at pool row `pages[j // page_size] *
  page_size + j % page_size`. A matrix of width W is stored in one of two
  forms (`matrix_form`), chosen so that 8 consecutive rank rows are always one
  2-D tile of some view of the pool (what a kernel's TMA copy reads):
  - *flat*, when W divides H or H divides W: row-major, so in the `[*, W]`
    view of the pool (W | H: H/W rank rows per pool row; H | W: W/H pool rows
    per rank row) rank row i is row `o + i` of that view;
  - *chunked*, otherwise (an MLP matrix of width F, e.g. 11008 beside 4096):
    in columns chunks of C = gcd(W, H), chunk-major, each chunk holding the
    rank rows padded to a multiple of 8: in the `[*, C]` view, element (i, j)
    is at row `o + (j // C) * round_up(r, 8) + i`, column `j % C`.
  Each matrix starts at a row offset `o` (in its view) that is a multiple of 8
  (of 1 for H | W), so the 8-row groups of a kernel read no row of another
  matrix; this wastes at most 7 rows of the view per matrix.

The device side never allocates: the host allocator (`slora_jax.allocator`)
hands out page ids, and the pure functions here write pages at those ids.
Page 0 is the null page: never allocated, the sink of padding writes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels.geometry import (GROUP, ceil_div, kv_page_view, matrix_align,  # noqa: F401
                                     matrix_form, round_up)
from slora_jax.config import MODULES, EngineConfig, ModelConfig

NULL_PAGE = 0


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Page geometry derived from a model and an engine config. Static."""
    num_layers: int
    num_pages: int
    page_size: int
    row_width: int          # H
    num_kv_heads: int
    head_dim: int
    max_rank: int
    module_shapes: tuple[tuple[int, int], ...]  # (in, out) per MODULES entry
    lora_modules: tuple[str, ...] = MODULES     # modules adapters may target

    @staticmethod
    def create(mc: ModelConfig, ec: EngineConfig) -> "PoolLayout":
        layout = PoolLayout(
            num_layers=mc.num_layers, num_pages=ec.num_pages, page_size=ec.page_size,
            row_width=mc.hidden_size, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            max_rank=ec.max_rank,
            module_shapes=tuple(mc.module_shape(m) for m in MODULES),
            lora_modules=ec.lora_modules)
        if layout.tokens_per_page < 1:
            raise ValueError(
                f"page_size={ec.page_size} rows of {mc.hidden_size} cannot hold one token's "
                f"K and V ({2 * mc.kv_size} elements); raise page_size")
        return layout

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def page_elems(self) -> int:
        return self.page_size * self.row_width

    @property
    def tokens_per_page(self) -> int:
        return self.page_elems // (2 * self.kv_size)

    def kv_pages_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.tokens_per_page)

    def matrix_rows(self, rank: int, width: int) -> int:
        """Pool rows taken by one [rank, width] adapter matrix (see `matrix_form`)."""
        c, chunks = matrix_form(width, self.row_width)
        if chunks == 1:
            return ceil_div(rank * width, self.row_width)
        return ceil_div(chunks * round_up(rank, GROUP) * c, self.row_width)

    def adapter_offsets(self, ranks: dict[str, int]) -> tuple[np.ndarray, int]:
        """Row offsets [M, 2] (A^T, B) of each module in the row stream, and its length.

        Each offset is aligned by `matrix_align`, so kernels read whole 8-row groups."""
        offsets = np.zeros((len(MODULES), 2), np.int32)
        row = 0
        for i, m in enumerate(MODULES):
            r = ranks.get(m, 0)
            if not r:
                continue
            for j, width in enumerate(self.module_shapes[i]):
                row = round_up(row, matrix_align(width, self.row_width))
                offsets[i, j] = row
                row += self.matrix_rows(r, width)
        return offsets, row

    def adapter_pages_for(self, ranks: dict[str, int]) -> int:
        return ceil_div(self.adapter_offsets(ranks)[1], self.page_size)

    @property
    def max_adapter_pages(self) -> int:
        """Pages of an adapter of max_rank on every module: the slot table width."""
        return self.adapter_pages_for({m: self.max_rank for m in MODULES})


@struct.dataclass
class Pool:
    """Device state: one `[num_pages, page_size, H]` array per layer."""
    layers: tuple[jax.Array, ...]


def init_pool(layout: PoolLayout, dtype=jnp.bfloat16) -> Pool:
    """A zeroed pool, created on the default device (never on the host)."""
    shape = (layout.num_pages, layout.page_size, layout.row_width)

    @jax.jit
    def make():
        return Pool(layers=tuple(jnp.zeros(shape, dtype) for _ in range(layout.num_layers)))
    return make()


# --- KV pages -----------------------------------------------------------------

def write_kv(layer: jax.Array, k: jax.Array, v: jax.Array, page: jax.Array,
             slot: jax.Array, layout: PoolLayout) -> jax.Array:
    """Write K/V of T tokens into their pages. Pure; in place under donation.

    layer: [P, page_size, H]; k, v: [T, n_kv, hd]; page, slot: [T] int32
    (the page id and the token's index inside the page).
    """
    t = k.shape[0]
    kv, tpp = layout.kv_size, layout.tokens_per_page
    flat = layer.reshape(layer.shape[0], layout.page_elems)
    cols = jnp.arange(kv, dtype=jnp.int32)
    k_off = slot[:, None] * kv + cols[None, :]
    v_off = k_off + tpp * kv
    rows = jnp.broadcast_to(page[:, None], (t, kv))
    flat = flat.at[rows, k_off].set(k.reshape(t, kv).astype(layer.dtype), mode="drop")
    flat = flat.at[rows, v_off].set(v.reshape(t, kv).astype(layer.dtype), mode="drop")
    return flat.reshape(layer.shape)


def kv_location(kv_pages: jax.Array, positions: jax.Array, layout: PoolLayout):
    """Page id and in-page slot of each token. kv_pages: [T, Pk]; positions: [T]."""
    tpp = layout.tokens_per_page
    idx = jnp.minimum(positions // tpp, kv_pages.shape[1] - 1)
    page = jnp.take_along_axis(kv_pages, idx[:, None], axis=1)[:, 0]
    return page, positions % tpp


# --- adapter pages ----------------------------------------------------------

def adapter_row_view(layer: jax.Array) -> jax.Array:
    """[num_pages, page_size, H] -> [num_pages*page_size, H]: adapter rows."""
    return layer.reshape(-1, layer.shape[-1])


@functools.partial(jax.jit, donate_argnums=(0,))
def load_adapter_pages(pool: Pool, pages: jax.Array, rows: jax.Array) -> Pool:
    """Copy an adapter's packed rows into its pages, in every layer.

    pages: [n] int32 page ids (pad with NULL_PAGE); rows: [L, n, page_size, H].
    """
    return Pool(layers=tuple(
        layer.at[pages].set(rows[i].astype(layer.dtype), mode="drop")
        for i, layer in enumerate(pool.layers)))


def pack_adapter_rows(weights: list[dict[str, tuple[np.ndarray, np.ndarray]]],
                      ranks: dict[str, int], layout: PoolLayout,
                      dtype=np.float32) -> np.ndarray:
    """Host-side: lay an adapter out as pool rows, [L, n_pages, page_size, H].

    weights[l][module] = (A^T [r, in], B [r, out]) for each targeted module.
    """
    offsets, n_rows = layout.adapter_offsets(ranks)
    n_pages = ceil_div(n_rows, layout.page_size)
    h = layout.row_width
    out = np.zeros((layout.num_layers, n_pages * layout.page_size * h), dtype)
    for l, mods in enumerate(weights):
        for i, m in enumerate(MODULES):
            if m not in mods:
                continue
            for j, mat in enumerate(mods[m]):
                start = int(offsets[i, j]) * h
                flat = chunked_matrix(np.asarray(mat), h).reshape(-1)
                out[l, start:start + flat.size] = flat
    return out.reshape(layout.num_layers, n_pages, layout.page_size, h)


def chunked_matrix(mat: np.ndarray, row_width: int) -> np.ndarray:
    """A `[r, W]` matrix in its stored form: itself when flat, else `[chunks,
    round_up(r, 8), C]` (zero rank rows past r). Host-side."""
    r, w = mat.shape
    c, chunks = matrix_form(w, row_width)
    if chunks == 1:
        return mat
    out = np.zeros((chunks, round_up(r, GROUP), c), mat.dtype)
    out[:, :r] = mat.reshape(r, chunks, c).transpose(1, 0, 2)
    return out
