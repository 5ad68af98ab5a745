"""Read a llama-architecture GGUF file: an HF-style config, dequantized weights under HF
tensor names, and the tokenizer metadata (`read_gguf_llama`). serving/gguf_convert.py writes
them out as a Hugging Face folder.

Facts this relies on:

* GGUF lists tensor dimensions in ggml order (fastest-varying first), i.e. the
  reverse of numpy's; ``gguf.quants.dequantize`` returns numpy order, which for
  a linear layer is HF's ``[out_features, in_features]``.
* llama.cpp's HF->GGUF converter reorders the rows of ``q_proj`` (per attention
  head) and ``k_proj`` (per KV head) from HF's "rotate half" layout to the
  interleaved-pairs layout ggml's rope uses.  Within a head of size ``d`` the
  HF row ``s * d/2 + j`` (s in {0, 1}) is stored at GGUF row ``2 * j + s``;
  ``_unpermute_rope_rows`` undoes that.

The ``gguf`` package is an optional dependency, imported lazily; nothing here imports JAX.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

# ggml token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL = 1, 2, 3
_TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 4, 5, 6

# GGUF per-layer tensor suffix -> HF per-layer tensor suffix.
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

class GGUFFormatError(ValueError):
    """A GGUF file that is not what this converter can handle."""


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def _import_gguf():
    try:
        import gguf  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            "reading GGUF files needs the optional dependency `gguf` "
            "(pip install gguf)"
        ) from exc
    return gguf


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:  # pragma: no cover - tqdm is normally present
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


_MISSING = object()


def _get(reader, key: str, path: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFFormatError(f"{path}: missing GGUF metadata key {key!r}")
        return default
    return field.contents()


def _clean_float(value: Any) -> float:
    """float32 metadata -> the short decimal it was written from (1e-05)."""
    return float(str(np.float32(value)))


def _check_magic(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFFormatError(
            f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')"
        )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head q/k row interleaving (see module docstring).

    Works for weights ``[n_heads * head_dim, in]`` and biases ``[n_heads * head_dim]``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFFormatError(
            f"cannot un-permute {rows} rows over {n_heads} heads (head_dim must be even)"
        )
    half = rows // n_heads // 2
    rest = w.shape[1:]
    return (w.reshape(n_heads, half, 2, *rest)
             .swapaxes(1, 2)
             .reshape(w.shape))


def _config_from_metadata(reader, path: str, tensor_names: set[str],
                          n_tokens: int) -> dict[str, Any]:
    arch = _get(reader, "general.architecture", path)
    if arch != "llama":
        raise GGUFFormatError(
            f"{path}: general.architecture is {arch!r}; only 'llama' is supported"
        )
    p = "llama."
    hidden = int(_get(reader, p + "embedding_length", path))
    n_heads = int(_get(reader, p + "attention.head_count", path))
    n_kv = int(_get(reader, p + "attention.head_count_kv", path, n_heads))
    head_dim = int(_get(reader, p + "attention.key_length", path, hidden // n_heads))
    v_dim = int(_get(reader, p + "attention.value_length", path, head_dim))
    if v_dim != head_dim:
        raise GGUFFormatError(
            f"{path}: llama.attention.value_length {v_dim} != key_length {head_dim}"
        )
    rope_dim = int(_get(reader, p + "rope.dimension_count", path, head_dim))
    if rope_dim != head_dim:
        raise GGUFFormatError(
            f"{path}: llama.rope.dimension_count {rope_dim} != head_dim {head_dim}; "
            "partial rotary embeddings are not supported"
        )
    rope_scaling = None
    scaling_type = _get(reader, p + "rope.scaling.type", path, "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": _clean_float(_get(reader, p + "rope.scaling.factor", path))}
    elif scaling_type not in ("none", None):
        raise GGUFFormatError(
            f"{path}: llama.rope.scaling.type {scaling_type!r} is not supported"
        )
    if "rope_freqs.weight" in tensor_names:
        raise GGUFFormatError(
            f"{path}: tensor 'rope_freqs.weight' (llama3-style rope scaling) is not supported"
        )
    vocab = int(_get(reader, p + "vocab_size", path, n_tokens))
    if n_tokens and vocab != n_tokens:
        raise GGUFFormatError(
            f"{path}: llama.vocab_size {vocab} != len(tokenizer.ggml.tokens) {n_tokens}"
        )
    t = "tokenizer.ggml."
    bos = _get(reader, t + "bos_token_id", path, None)
    eos = _get(reader, t + "eos_token_id", path, None)
    pad = _get(reader, t + "padding_token_id", path, None)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_get(reader, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_get(reader, p + "block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _clean_float(
            _get(reader, p + "attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _clean_float(_get(reader, p + "rope.freq_base", path, 10000.0)),
        "rope_scaling": rope_scaling,
        "vocab_size": vocab,
        "max_position_embeddings": int(_get(reader, p + "context_length", path)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
    }


def _tokenizer_meta(reader, path: str) -> dict[str, Any]:
    t = "tokenizer.ggml."
    meta: dict[str, Any] = {
        "model": _get(reader, t + "model", path),
        "pre": _get(reader, t + "pre", path, "default"),
        "tokens": list(_get(reader, t + "tokens", path)),
        "token_type": [int(x) for x in _get(reader, t + "token_type", path, [])],
        "merges": list(_get(reader, t + "merges", path, [])),
        "add_bos_token": bool(_get(reader, t + "add_bos_token", path, False)),
        "add_eos_token": bool(_get(reader, t + "add_eos_token", path, False)),
        "add_space_prefix": bool(_get(reader, t + "add_space_prefix", path, False)),
        "chat_template": _get(reader, "tokenizer.chat_template", path, None),
    }
    for name in ("bos", "eos", "unknown", "padding"):
        value = _get(reader, f"{t}{name}_token_id", path, None)
        meta[f"{name}_token_id"] = None if value is None else int(value)
    if not meta["token_type"]:
        meta["token_type"] = [_TOKEN_NORMAL] * len(meta["tokens"])
    return meta


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, ff = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    shapes = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
    }
    if cfg["attention_bias"]:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
    for i in range(cfg["num_hidden_layers"]):
        for k, v in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = v
    return shapes


def read_gguf_llama(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Read a llama-architecture GGUF file.

    Returns ``(config, tensors, tokenizer_meta)``: ``config`` is a dict of HF
    ``LlamaConfig`` fields (no dtype); ``tensors`` maps HF tensor names to
    float32 numpy arrays in HF layout (q/k rows un-permuted); ``tokenizer_meta``
    holds the ``tokenizer.ggml.*`` values (tokens, merges, token types, special
    ids, pre-tokenizer name) plus ``chat_template``.
    """
    path = os.fspath(path)
    _check_magic(path)
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:
        raise GGUFFormatError(f"{path}: cannot parse GGUF file: {exc}") from exc

    names = {t.name for t in reader.tensors}
    tok_meta = _tokenizer_meta(reader, path)
    cfg = _config_from_metadata(reader, path, names, len(tok_meta["tokens"]))
    expected = _expected_shapes(cfg)

    tensors: dict[str, np.ndarray] = {}
    for t in _progress(reader.tensors, len(reader.tensors), "dequantizing GGUF"):
        m = _BLOCK_RE.match(t.name)
        if m is not None:
            suffix = _LAYER_MAP.get(m.group(2))
            hf_name = None if suffix is None else f"model.layers.{int(m.group(1))}.{suffix}"
        else:
            hf_name = _GLOBAL_MAP.get(t.name)
        if hf_name is None or hf_name not in expected:
            raise GGUFFormatError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise GGUFFormatError(
                f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}"
            ) from exc
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        ggml_shape = tuple(int(d) for d in reversed(list(t.shape)))
        want = expected[hf_name]
        if arr.shape != want or ggml_shape != want:
            raise GGUFFormatError(
                f"{path}: tensor {t.name!r} has shape {arr.shape} (ggml dims "
                f"{[int(d) for d in t.shape]}), expected {want} for {hf_name}"
            )
        if ".q_proj." in hf_name:
            arr = _unpermute_rope_rows(arr, cfg["num_attention_heads"])
        elif ".k_proj." in hf_name:
            arr = _unpermute_rope_rows(arr, cfg["num_key_value_heads"])
        tensors[hf_name] = np.ascontiguousarray(arr)

    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFFormatError(
            f"{path}: missing {len(missing)} tensor(s), e.g. {missing[:3]}"
        )
    return cfg, tensors, tok_meta


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------
