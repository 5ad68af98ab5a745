"""The engine's jitted device calls: a step (slora_jax.step) plus the token-buffer
gather/scatter, one dispatch each, with the pool and the token buffer donated."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from serving.packing import Packing, unpack
from slora_jax.model import StepSpec
from slora_jax.params import Params
from slora_jax.pool import load_adapter_pages
from slora_jax.step import decode, mixed

@functools.partial(jax.jit, static_argnames=("spec", "packing"),
                   donate_argnames=("pool", "tok_buf"))
def prefill_step(params: Params, pool, tok_buf: jax.Array, packed: jax.Array, *,
                 spec: StepSpec, packing: Packing):
    """packed: the (MixedBatch, rows [B + R]) pair in one buffer; rows are the decode rows'
    and then the prompts' token-buffer rows (the dump row for padding, and for a chunk
    that does not end its prompt). The decode rows' input tokens come from `tok_buf`."""
    batch, rows = unpack(packed, packing)
    b = batch.decode.tokens.shape[0]
    batch = batch.replace(decode=batch.decode.replace(tokens=tok_buf[rows[:b]]))
    pool, out = mixed(params, pool, batch, spec=spec)
    return pool, tok_buf.at[rows].set(out.tokens), out.tokens, out.logprobs


@functools.partial(jax.jit, static_argnames=("spec", "packing"),
                   donate_argnames=("pool", "tok_buf"))
def decode_step(params: Params, pool, tok_buf: jax.Array, packed: jax.Array, *,
                spec: StepSpec, packing: Packing):
    """Input tokens come from `tok_buf[rows]`: the previous steps' samples, still on device."""
    batch, rows = unpack(packed, packing)
    pool, out = decode(params, pool, batch.replace(tokens=tok_buf[rows]), spec=spec)
    return pool, tok_buf.at[rows].set(out.tokens), out.tokens, out.logprobs


JITTED = (prefill_step, decode_step, load_adapter_pages)     # every shape: Engine.warmup


@dataclasses.dataclass
class Inflight:
    """A dispatched step whose tokens the engine has not read back yet."""
    kind: str                 # "prefill" | "decode"
    seqs: list[Any]           # serving.scheduler.Seq, each sampling a token in this step
    epochs: list[int]         # each one's epoch at dispatch (a preemption makes it stale)
    index: list[int]          # each one's row in `tokens`
    tokens: jax.Array
    logprobs: jax.Array
    t_dispatch: float
