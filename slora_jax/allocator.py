"""The host-side page allocator of the unified pool: a free list in numpy.

The device never allocates. This allocator hands out page ids to owners (a
request's KV cache, or an adapter), takes them back, and keeps the accounting
that `waste()` reports: for KV and for adapters, bytes allocated versus bytes
holding data. Page 0 (`NULL_PAGE`) is never handed out.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable

import numpy as np

from slora_jax.pool import NULL_PAGE, PoolLayout

KINDS = ("kv", "adapter")


class OutOfPages(RuntimeError):
    """Not enough free pages; nothing was allocated."""


@dataclasses.dataclass
class _Owner:
    kind: str
    pages: list[int]
    used_elems: int = 0      # elements per layer holding data


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("a pool needs at least 2 pages (page 0 is the null page)")
        self.num_pages = num_pages
        # A stack: pop from the end. Low ids are handed out first.
        self._free = np.arange(num_pages - 1, NULL_PAGE, -1, dtype=np.int32)
        self._top = len(self._free)
        self._in_use = np.zeros(num_pages, bool)
        self._in_use[NULL_PAGE] = True
        self._owners: dict[Hashable, _Owner] = {}

    # -- allocation --------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._top

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def can_alloc(self, n: int) -> bool:
        return n <= self._top

    def alloc(self, owner: Hashable, n: int, kind: str = "kv") -> np.ndarray:
        """n more pages for `owner`; raises OutOfPages (allocating nothing) if short."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        o = self._owners.get(owner)
        if o is not None and o.kind != kind:
            raise ValueError(f"owner {owner!r} holds {o.kind} pages, not {kind}")
        if n < 0:
            raise ValueError("n must be >= 0")
        if n > self._top:
            raise OutOfPages(f"asked for {n} pages, {self._top} free of {self.capacity}")
        pages = self._free[self._top - n:self._top][::-1].copy()
        self._top -= n
        assert not self._in_use[pages].any(), "allocator corrupted: page handed out twice"
        self._in_use[pages] = True
        if o is None:
            o = self._owners[owner] = _Owner(kind, [])
        o.pages.extend(int(p) for p in pages)
        return pages

    def free(self, owner: Hashable) -> int:
        """Return all of `owner`'s pages; returns how many. Unknown owners free nothing."""
        o = self._owners.pop(owner, None)
        if o is None:
            return 0
        pages = np.asarray(o.pages, np.int32)
        if not self._in_use[pages].all():
            raise AssertionError(f"allocator corrupted: {owner!r} frees a free page")
        self._in_use[pages] = False
        self._free[self._top:self._top + len(pages)] = pages[::-1]
        self._top += len(pages)
        return len(pages)

    def pages(self, owner: Hashable) -> list[int]:
        o = self._owners.get(owner)
        return list(o.pages) if o else []

    def owners(self, kind: str | None = None) -> list[Hashable]:
        return [k for k, o in self._owners.items() if kind is None or o.kind == kind]

    def set_used(self, owner: Hashable, used_elems: int) -> None:
        """Record how many elements (per layer) of the owner's pages hold data."""
        self._owners[owner].used_elems = used_elems

    # -- accounting --------------------------------------------------------------
    def pages_used(self, kind: str) -> int:
        return sum(len(o.pages) for o in self._owners.values() if o.kind == kind)

    def waste(self, layout: PoolLayout, itemsize: int) -> dict[str, dict[str, int]]:
        """Bytes allocated and bytes holding data, per kind, over all layers.

        Waste of KV = the unused tail of each sequence's last page plus each
        page's remainder that cannot hold a whole token; waste of adapters =
        the unused tail of each adapter's last page plus the partial last row
        of each packed matrix.
        """
        out = {}
        per_page = layout.page_elems * itemsize * layout.num_layers
        for kind in KINDS:
            owners = [o for o in self._owners.values() if o.kind == kind]
            alloc = sum(len(o.pages) for o in owners) * per_page
            used = sum(o.used_elems for o in owners) * itemsize * layout.num_layers
            out[kind] = {"pages": sum(len(o.pages) for o in owners), "allocated_bytes": alloc,
                         "used_bytes": used, "wasted_bytes": alloc - used}
        return out


def kv_used_elems(num_tokens: int, layout: PoolLayout) -> int:
    return num_tokens * 2 * layout.kv_size


def adapter_used_elems(ranks: dict[str, int], layout: PoolLayout) -> int:
    from slora_jax.config import MODULES
    total = 0
    for i, m in enumerate(MODULES):
        r = ranks.get(m, 0)
        fin, fout = layout.module_shapes[i]
        total += r * (fin + fout)
    return total
