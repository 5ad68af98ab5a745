"""Where an adapter comes from (the store's disk tier: a PEFT folder inside the allowed
roots, a seeded dummy, or an object given directly; each source's `load` returns a
checked `LoraAdapter`) and what the store keeps of it in host RAM (`HostCopy`: pool rows
in chunks of power-of-two pages). The store itself is serving/adapter_store.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import numpy as np

from slora_jax.adapters import AdapterError, LoraAdapter, dummy_adapter, load_peft_adapter
from slora_jax.config import ModelConfig


class AdapterPathNotAllowed(AdapterError):
    """A `lora_path` outside the configured adapter roots."""


def inside(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class PeftSource:
    path: str
    roots: tuple[str, ...]

    def load(self, mc: ModelConfig, name: str, max_rank: int) -> LoraAdapter:
        for f in ("", "adapter_config.json", "adapter_model.safetensors"):
            p = os.path.join(self.path, f)
            if os.path.exists(p) and not inside(p, self.roots):
                raise AdapterPathNotAllowed(f"{f or 'the adapter folder'}: resolves outside the "
                                            "adapter roots", self.path)
        return load_peft_adapter(self.path, mc, name=name, max_rank=max_rank)


@dataclasses.dataclass(frozen=True)
class DummySource:
    rank: int
    modules: tuple[str, ...]
    seed: int
    std: float = 0.05

    def load(self, mc: ModelConfig, name: str, max_rank: int) -> LoraAdapter:
        # Unit-variance weights (views of shared noise, no copy) with std^2 in the scale:
        # the same LoRA term as weights of std `std`, made at the speed of the packing alone.
        ad = dummy_adapter(mc, self.rank, self.modules, seed=self.seed, std=1.0, name=name)
        return dataclasses.replace(ad, scales={m: s * self.std ** 2 for m, s in ad.scales.items()})


@dataclasses.dataclass(frozen=True, eq=False)
class MemorySource:
    """An adapter object given directly (tests, research code); never dropped."""
    adapter: LoraAdapter

    def load(self, mc: ModelConfig, name: str, max_rank: int) -> LoraAdapter:
        return self.adapter


def chunk_sizes(n_pages: int, largest: int) -> list[int]:
    """n_pages as full chunks of `largest` pages, then powers of two, largest first."""
    sizes = [largest] * (n_pages // largest)
    bit = largest // 2
    while bit:
        if n_pages % largest & bit:
            sizes.append(bit)
        bit //= 2
    return sizes


@dataclasses.dataclass(eq=False)
class HostCopy:
    chunks: list[np.ndarray]    # [L, c, page_size, H] each, pool dtype, contiguous
    n_pages: int
    rank: np.ndarray            # [M] int32
    scale: np.ndarray           # [M] float32
    offset: np.ndarray          # [M, 2] int32
    used_elems: int

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)
