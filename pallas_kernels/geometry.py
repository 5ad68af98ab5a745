"""The page geometry the kernels read, and nothing else: the one module of this package
that the others share, so that `pallas_kernels` imports nothing from the engine.

`slora_jax.pool` documents the layout these helpers describe (its `PoolLayout` is a
`KVLayout`): a pool layer is `[num_pages, page_size, H]`; a KV page holds K then V of
`tokens_per_page` tokens; an adapter matrix of width W is flat or chunked (`matrix_form`).
"""

from __future__ import annotations

import math
from typing import Protocol

import jax

GROUP = 8    # rank rows per kernel tile: matrices start 8-aligned, chunks hold multiples of 8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def matrix_form(width: int, row_width: int) -> tuple[int, int]:
    """(C, chunks) of a width-`width` matrix in H=`row_width` rows: chunks == 1 for the
    flat form (C = width), else the chunked form with C = gcd(width, H)."""
    if row_width % width == 0 or width % row_width == 0:
        return width, 1
    c = math.gcd(width, row_width)
    return c, width // c


def matrix_align(width: int, row_width: int) -> int:
    """Pool rows a matrix's start is aligned to: 8 rows of its view (one for H | W)."""
    c, chunks = matrix_form(width, row_width)
    if chunks == 1 and width > row_width:
        return width // row_width          # whole rank rows
    per = row_width // c                   # view rows per pool row
    return GROUP // math.gcd(GROUP, per)


class KVLayout(Protocol):
    """What the attention kernels need to know of a pool's KV pages."""
    tokens_per_page: int
    num_kv_heads: int
    head_dim: int
    kv_size: int          # num_kv_heads * head_dim
    page_elems: int       # page_size * H


def kv_page_view(layer: jax.Array, layout: KVLayout) -> jax.Array:
    """[num_pages, page_size, H] -> [num_pages, 2, tokens_per_page, n_kv, hd]."""
    tpp, kv = layout.tokens_per_page, layout.kv_size
    flat = layer.reshape(layer.shape[0], layout.page_elems)
    if 2 * tpp * kv != layout.page_elems:
        flat = flat[:, :2 * tpp * kv]
    return flat.reshape(layer.shape[0], 2, tpp, layout.num_kv_heads, layout.head_dim)
