"""The one-transfer step buffer: every leaf round-trips bit for bit and starts on a
256-byte boundary (Mosaic GPU kernels refuse operands that do not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.packing import ALIGN, pack, unpack


def _tree(rng):
    b, pages = int(rng.integers(1, 40)), int(rng.integers(1, 600))
    return {"tokens": rng.integers(0, 1 << 30, (b,), dtype=np.int32),
            "page_table": rng.integers(0, 1 << 20, (b, pages), dtype=np.int32),
            "scale": rng.standard_normal((b,)).astype(np.float32),
            "temperature": np.float32(rng.random()),
            "empty": np.zeros((0,), np.int32),
            "nan": np.array([np.nan, -np.inf, 1e-45], np.float32)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_round_trips_bit_for_bit_with_aligned_leaves(seed):
    tree = _tree(np.random.default_rng(seed))
    buf, packing = pack(tree)
    assert buf.dtype == np.int32 and buf.size % ALIGN == 0
    out = jax.jit(unpack, static_argnums=1)(jnp.asarray(buf), packing)
    for k, v in tree.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        assert np.asarray(out[k]).tobytes() == v.tobytes(), k
    # Each leaf's first element lies at a multiple of 64 int32s (256 bytes) of the buffer.
    o = 0
    for leaf in jax.tree.leaves(tree):
        assert o % ALIGN == 0
        np.testing.assert_array_equal(buf[o:o + leaf.size], np.ravel(leaf).view(np.int32))
        o += -(-leaf.size // ALIGN) * ALIGN
    assert o == buf.size


def test_pack_refuses_leaves_that_are_not_four_bytes_wide():
    with pytest.raises(TypeError, match="int64"):
        pack({"x": np.zeros(3, np.int64)})
