"""Helpers shared by the Mosaic GPU kernels (`lora_mgpu`, `paged_attention_mgpu`)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def default_interpret():
    """Run the kernels through the Mosaic GPU interpreter when there is no GPU."""
    return None if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams()


def smem_transforms(minor: int, dtype) -> tuple:
    """Tiling + the widest swizzle for an SMEM buffer whose minor dimension is `minor`."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def finite_or_zero(x: jax.Array) -> jax.Array:
    """x with its NaN and +-inf elements replaced by 0 (a select in registers).

    For a tile whose product with a 0 of the other operand must be exactly 0: a
    masked-out key's V row, an adapter's B row a token of another slot multiplies
    by 0. 0 * NaN is NaN, so a multiply by 0 (or a mask after the product) does not
    keep one tenant's non-finite values out of another's outputs."""
    return jnp.where(jnp.abs(x) < jnp.inf, x, jnp.zeros((), x.dtype))


def warn_once(log: logging.Logger, warned: set[str], what: str, message: str) -> None:
    """Log `message` the first time `what` is seen (a fallback to the reference)."""
    if what not in warned:
        warned.add(what)
        log.warning(message)
