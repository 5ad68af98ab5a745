"""The device mesh of S-LoRA tensor parallelism: one axis, `tp`, over N devices.

Everything in `sharding/` names the mesh axis through `TP_AXIS`; the model
code never sees the mesh (the partition specs in `sharding.specs` and the
shard_map'd steps in `sharding.tp_step` are the only places that do).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

TP_AXIS = "tp"


def make_tp_mesh(n: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh `("tp",)` over the first n devices (of `devices`, default all).

    The axis is `Auto` (not `Explicit`): shardings are declared by the specs
    table and applied by `device_put` / shard_map, not carried in array types.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not 1 <= n <= len(devs):
        raise ValueError(f"tensor-parallel size {n}: have {len(devs)} devices "
                         f"({devs[0].platform if devs else 'none'})")
    return jax.make_mesh((n,), (TP_AXIS,), axis_types=(AxisType.Auto,), devices=devs[:n])
