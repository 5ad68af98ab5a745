"""How evenly the LoRA kernels' work plan spreads a decode batch over thread blocks.

CPU only (XLA on small int arrays): for request i on adapter i % n with ranks cycling
through `--ranks` (as `e2e_decode.py` builds its batches), print per token tile the
chunks of 64 rank rows that the q/k/v shrink and the q expand pack, and the K steps of
the busiest shrink block against the mean, for tiles sorted by adapter or not and for
the shrink's "tile" and "balanced" splits. Work per block is what a block must stream;
the slowest block sets the kernel's time.

    python benchmarks/plan_balance.py --batches 32:32,128:32,256:128
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import lora_mgpu as lm  # noqa: E402
from pallas_kernels import lora_plan as lp  # noqa: E402


def shrink_steps(per_tile: np.ndarray, bt: int, num_slots: int, n_mod: int, max_rank: int,
                 k: int, balanced: bool) -> np.ndarray:
    """K steps of every shrink block, with the launch's default lanes and splits."""
    nt = len(per_tile)
    bk = lm._block_k(k, bt)
    bound = -(-min(bt, num_slots + 1) * n_mod * (-(-max_rank // lp.GROUP)) // lp.CHUNK)
    lanes = max(1, min(4, bound))
    splits = lm._divisor_at_most(k // bk, -(-lm.SHRINK_BLOCKS // (nt * lanes)))
    nk = k // bk // splits
    nb, total = nt * lanes, int(per_tile.sum())
    if balanced:
        chunks = [(b + 1) * total // nb - b * total // nb for b in range(nb)]
    else:
        chunks = [max(0, -(-(int(per_tile[t]) - lane) // lanes))
                  for t in range(nt) for lane in range(lanes)]
    return np.repeat(np.array(chunks) * nk, splits)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="32:32,32:1,128:32,256:32,256:128",
                    help="comma-separated batch:distinct_adapters")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--hidden", type=int, default=4096, help="shrink K (Llama-7B: 4096)")
    args = ap.parse_args(argv)
    ranks4 = [int(r) for r in args.ranks.split(",")]
    print("| batch | adapters | tile | sorted | chunks per tile (q/k/v shrink) "
          "| q expand max/mean | shrink tile: max/mean steps | shrink balanced: max/mean steps |")
    print("|---|---|---|---|---|---|---|---|")
    for bn in args.batches.split(","):
        b, n = map(int, bn.split(":"))
        ts = jnp.asarray(np.arange(b) % n, jnp.int32)
        r = np.array([ranks4[j % len(ranks4)] for j in range(n)])
        ranks = jnp.asarray(np.repeat(r[:, None], 3, 1), jnp.int32)
        for sort in (True, False):
            bt = lp.pick_block_tokens(b, n)
            plan = lp.plan_batch(ts, n, bt, sort=sort)
            nt = -(-b // bt)
            per_tile = np.diff(np.asarray(lp._pack(plan, ranks, nt)[0]))
            nch = np.diff(np.asarray(lp._pack(plan, ranks[:, :1], nt)[0]))
            cols = []
            for balanced in (False, True):
                w = shrink_steps(per_tile, bt, n, 3, max(ranks4), args.hidden, balanced)
                cols.append(f"{w.max()} / {w.mean():.1f} ({w.max() / max(w.mean(), 1e-9):.2f}x)")
            tiles = per_tile.tolist()
            shown = " ".join(map(str, tiles[:8])) + (" ..." if len(tiles) > 8 else "")
            print(f"| {b} | {n} | {bt} | {'yes' if sort else 'no'} | {shown} | "
                  f"{nch.max() / max(nch.mean(), 1e-9):.2f}x | {cols[0]} | {cols[1]} |")


if __name__ == "__main__":
    main()
