"""An independent dense Llama + LoRA in numpy float64: no pool, no paging, no batching.

It shares nothing with `slora_jax.model` but the config: weights are read back
from a `Params` pytree and adapters from `LoraAdapter` (A^T, B) arrays, and the
whole sequence is recomputed for every token. Tests compare the engine to it.
"""

from __future__ import annotations

import math

import numpy as np

from slora_jax.adapters import LoraAdapter
from slora_jax.config import ModelConfig


def _np(x):
    return np.asarray(x, np.float64)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _inv_freq(mc: ModelConfig):
    d = mc.head_dim
    inv = 1.0 / mc.rope_theta ** (np.arange(0, d, 2) / d)
    rs = mc.rope_scaling
    if rs is None:
        return inv
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        lo, hi = rs.original_max_position_embeddings / rs.low_freq_factor, \
            rs.original_max_position_embeddings / rs.high_freq_factor
        if wl < hi:
            out.append(f)
        elif wl > lo:
            out.append(f / rs.factor)
        else:
            s = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - s) * f / rs.factor + s * f)
    return np.array(out)


def _rope(x, pos, inv):
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = np.split(x, 2, -1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def dense_logits(params, mc: ModelConfig, tokens, adapter: LoraAdapter | None = None):
    """Logits [len(tokens), V] of one sequence, LoRA applied unmerged per module."""
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    inv = _inv_freq(mc)

    def lin(x, w, layer, mod):
        y = x @ _np(w)
        if adapter is not None and mod in adapter.ranks:
            a_t, b = adapter.weights[layer][mod]
            y = y + adapter.scales[mod] * (x @ _np(a_t).T) @ _np(b)
        return y

    x = _np(params.embed)[np.asarray(tokens)]
    mask = np.tril(np.ones((t, t), bool))
    if mc.sliding_window:
        mask &= (pos[:, None] - pos[None, :]) < mc.sliding_window
    g = mc.num_heads // mc.num_kv_heads
    for li, lp in enumerate(params.layers):
        h = _rms(x, _np(lp.attn_norm), mc.rms_norm_eps)
        q = _rope(lin(h, lp.wq, li, "q").reshape(t, mc.num_heads, mc.head_dim), pos, inv)
        k = _rope(lin(h, lp.wk, li, "k").reshape(t, mc.num_kv_heads, mc.head_dim), pos, inv)
        v = lin(h, lp.wv, li, "v").reshape(t, mc.num_kv_heads, mc.head_dim)
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(mc.head_dim)
        s = np.where(mask[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", p, v).reshape(t, -1)
        x = x + lin(att, lp.wo, li, "o")
        h = _rms(x, _np(lp.mlp_norm), mc.rms_norm_eps)
        gate, up = lin(h, lp.w_gate, li, "gate"), lin(h, lp.w_up, li, "up")
        act = gate / (1 + np.exp(-gate)) * up
        x = x + lin(act, lp.w_down, li, "down")
    x = _rms(x, _np(params.final_norm), mc.rms_norm_eps)
    head = _np(params.embed).T if params.lm_head is None else _np(params.lm_head)
    return x @ head


def dense_greedy(params, mc, prompt, n, adapter=None):
    """Greedy continuation of n tokens, recomputing the whole sequence each step."""
    seq = list(prompt)
    out, logits = [], []
    for _ in range(n):
        lg = dense_logits(params, mc, seq, adapter)[-1]
        tok = int(np.argmax(lg))
        out.append(tok)
        logits.append(lg)
        seq.append(tok)
    return out, np.stack(logits)
