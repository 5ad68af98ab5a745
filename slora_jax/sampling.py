"""On-device sampling: greedy, temperature, top-k, top-p, seeded per request.

Each request's randomness is `fold_in(PRNGKey(seed), position)`, so a request
draws the same tokens whatever batch it runs in (batching invariance), and a
seeded request is reproducible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [N] float32; 0 = greedy
    top_p: jax.Array        # [N] float32; 1 = off
    top_k: jax.Array        # [N] int32; 0 = off
    seed: jax.Array         # [N] int32


def _filtered_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature, then top-k and top-p masks. logits: [N, V] float32."""
    v = logits.shape[-1]
    t = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    scaled = logits / t[:, None]
    desc = -jnp.sort(-scaled, axis=-1)                                        # [N, V]
    k = jnp.where(sp.top_k > 0, jnp.minimum(sp.top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above each token
    keep = (before < sp.top_p[:, None]) & (jnp.arange(v)[None, :] < k[:, None])
    keep = keep.at[:, 0].set(True)
    thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= jnp.maximum(thresh, kth), scaled, -jnp.inf)


def sample(logits: jax.Array, sp: SamplingParams, positions: jax.Array):
    """Pick one token per row. Returns (tokens [N] int32, logprobs [N] float32).

    The logprob is that of the chosen token under the model's own distribution
    (log_softmax of the raw logits), as OpenAI-style APIs report it.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Drawn for every row and selected, not behind a `lax.cond` on "any row samples": on
    # the GPU a conditional copies its predicate to the host and blocks it, so the host
    # could no longer dispatch the next step while this one runs.
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(
        sp.seed.astype(jnp.uint32), positions)
    drawn = jax.vmap(jax.random.categorical)(keys, _filtered_logits(logits, sp))
    tokens = jnp.where(sp.temperature > 0, drawn.astype(jnp.int32), greedy)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], -1)[:, 0]
    return tokens, logprobs
