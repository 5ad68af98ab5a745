#!/usr/bin/env python
"""Build the HF Transformers + PEFT numerical oracle fixtures for slora-jax.

Creates two tiny random Llama models (``tiny_mha`` and ``tiny_gqa``), five PEFT
LoRA adapters for each, a list of requests, and the reference outputs of every
request run alone (batch 1) through HF + PEFT in float32 with eager attention.

Run with the oracle venv (torch CPU, transformers, peft)::

    .venv-oracle/bin/python tests/oracle/make_fixtures.py            # -> tests/fixtures
    .venv-oracle/bin/python tests/oracle/make_fixtures.py --check-only

Importing this module has no side effects; ``run_oracle`` is the reusable part.
See tests/oracle/README.md for the file format.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from typing import Any

N_DECODE = 24
MIN_MARGIN = 1.5e-2  # required min(top1 - top2) over every logit row a greedy token is taken from
MAX_TRIALS = 50  # seed trials per model until the margin / adapter-effect conditions hold

# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "tiny_mha": dict(
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=176,  # not a multiple of hidden
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        seed=1049,  # picked from a scan of seeds 1000-1059: largest min margin
    ),
    "tiny_gqa": dict(
        config=dict(
            vocab_size=211,
            hidden_size=48,
            intermediate_size=100,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 200,  # puts one wavelength in the smoothing band
            },
        ),
        seed=2017,  # picked from a scan of seeds 2000-2059: largest min margin
    ),
}

# Random init used instead of HF's own init (so regeneration does not depend on HF
# init details): Linear / Embedding weights ~ N(0, INIT_STD); RMSNorm weights
# ~ 1 + N(0, NORM_JITTER); the final norm is additionally multiplied by LOGIT_GAIN so
# the logits are peaked (works for tied and untied lm_head alike).
INIT_STD = 0.15
NORM_JITTER = 0.1
LOGIT_GAIN = 3.0

ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "r2_qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r8_attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r4_mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r16_rslora_all": dict(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "r1_o_down": dict(r=1, lora_alpha=3, target_modules=["o_proj", "down_proj"]),
}

# (prompt length, adapter or None, id of an earlier request whose prompt is reused or None)
REQUEST_LAYOUT: list[tuple[int, str | None, str | None]] = [
    (1, "r2_qv", None),  # r00: length-1 prompt
    (5, None, None),  # r01: base
    (5, "r8_attn", "r01"),  # r02: same prompt as r01, with an adapter
    (5, "r16_rslora_all", None),  # r03
    (17, "r4_mlp", None),  # r04
    (9, "r1_o_down", None),  # r05
    (12, None, None),  # r06: base
    (3, "r8_attn", None),  # r07: r8_attn used a second time
    (17, "r16_rslora_all", None),  # r08
    (1, None, None),  # r09: base, length 1
]


# --------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------


def _greedy(model, prompt_ids: list[int], n_decode: int) -> dict[str, Any]:
    """Prefill + greedy decode with the KV cache, batch 1. ``model`` is HF or PEFT."""
    import numpy as np
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].float().clone()  # [L, V]
        past = out.past_key_values
        rows = [prefill[-1]]
        toks = [int(torch.argmax(prefill[-1]))]
        for _ in range(n_decode - 1):
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            row = out.logits[0, -1].float().clone()
            rows.append(row)
            toks.append(int(torch.argmax(row)))
    dec = torch.stack(rows)  # [n_decode, V]
    top2 = torch.topk(dec, 2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).numpy()
    return {
        "prefill_logits": prefill.numpy().astype(np.float32),
        "greedy_tokens": np.asarray(toks, dtype=np.int32),
        "decode_logits": dec.numpy().astype(np.float32),
        "min_margin": float(margins.min()),
        "min_margin_step": int(margins.argmin()),
    }


def load_hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def load_peft_model(model_dir: str, adapter_dirs: dict[str, str]):
    """HF model with every adapter loaded under its own name (PeftModel)."""
    from peft import PeftModel

    model = load_hf_model(model_dir)
    names = list(adapter_dirs)
    if not names:
        return model
    pm = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(adapter_dirs[name], adapter_name=name)
    pm.eval()
    return pm


def run_oracle(
    model_dir: str,
    adapter_dirs: dict[str, str],
    requests: list[dict],
    n_decode: int,
    _model=None,
) -> list[dict]:
    """Run each request alone through HF + PEFT.

    requests: [{"id": str, "prompt_token_ids": [int], "adapter": str | None}, ...]
    Returns, per request, {"id", "adapter", "prefill_logits" f32[L, V],
    "greedy_tokens" i32[n_decode], "decode_logits" f32[n_decode, V], "min_margin",
    "min_margin_step"} where decode_logits[0] == prefill_logits[-1] and
    greedy_tokens[i] == argmax(decode_logits[i]).
    """
    pm = _model if _model is not None else load_peft_model(model_dir, adapter_dirs)
    results = []
    for req in requests:
        name = req.get("adapter")
        if name is None:
            if hasattr(pm, "disable_adapter"):
                with pm.disable_adapter():
                    res = _greedy(pm, req["prompt_token_ids"], n_decode)
            else:
                res = _greedy(pm, req["prompt_token_ids"], n_decode)
        else:
            if name not in adapter_dirs:
                raise KeyError(f"request {req['id']!r} uses unknown adapter {name!r}")
            pm.set_adapter(name)
            res = _greedy(pm, req["prompt_token_ids"], n_decode)
        res["id"] = req["id"]
        res["adapter"] = name
        results.append(res)
    return results


def recompute_without_cache(model, prompt_ids: list[int], greedy_tokens) -> "Any":
    """Logits for prompt + greedy_tokens[:-1] in one no-cache forward (rows from L-1 on)."""
    import torch

    seq = list(prompt_ids) + [int(t) for t in greedy_tokens[:-1]]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
    return logits[len(prompt_ids) - 1 :].float().numpy()


# --------------------------------------------------------------------------------------
# Fixture construction
# --------------------------------------------------------------------------------------


def build_model(name: str, seed: int, out_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **MODEL_SPECS[name]["config"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=INIT_STD,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + NORM_JITTER * torch.randn(p.shape, generator=gen))
                if pname == "model.norm.weight":
                    p.mul_(LOGIT_GAIN)
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(out_dir, safe_serialization=True)
    gcfg = os.path.join(out_dir, "generation_config.json")  # not needed; keep the folder minimal
    if os.path.exists(gcfg):
        os.remove(gcfg)


def build_adapter(model_dir: str, name: str, seed: int, out_dir: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_hf_model(model_dir)
    spec = dict(ADAPTER_SPECS[name])
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # B non-zero; values are overwritten below anyway
        **spec,
    )
    pm = get_peft_model(base, cfg)  # adapter_name "default" -> saved straight into out_dir
    # Explicit, seeded init (independent of PEFT's init code): nn.Linear-style uniform,
    # A ~ U(+-1/sqrt(in)), B ~ U(+-1/sqrt(r)), visited in sorted parameter-name order.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in pname or ".lora_B." in pname:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_((2.0 * torch.rand(p.shape, generator=gen) - 1.0) * bound)
    pm.save_pretrained(out_dir, safe_serialization=True)
    # Tidy what PEFT writes: no model card; a stable base path; sorted target_modules
    # ("all-linear" is resolved to a Python set, whose order varies between runs).
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)
    cpath = os.path.join(out_dir, "adapter_config.json")
    with open(cpath) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = "../../model"
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(cpath, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")


def make_requests(vocab: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    reqs: list[dict] = []
    by_id: dict[str, dict] = {}
    for i, (length, adapter, reuse) in enumerate(REQUEST_LAYOUT):
        rid = f"r{i:02d}"
        if reuse is not None:
            toks = list(by_id[reuse]["prompt_token_ids"])
            assert len(toks) == length
        else:
            toks = [int(t) for t in rng.integers(0, vocab, size=length)]
        req = {"id": rid, "prompt_token_ids": toks, "adapter": adapter}
        reqs.append(req)
        by_id[rid] = req
    return reqs


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _versions() -> dict[str, str]:
    import numpy
    import peft
    import safetensors
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


def adapter_dirs_for(model_root: str) -> dict[str, str]:
    return {n: os.path.join(model_root, "adapters", n) for n in ADAPTER_SPECS}


def try_build(name: str, seed: int, root: str, n_decode: int) -> tuple[bool, dict]:
    """Build model/adapters/requests under root and evaluate; return (ok, info)."""
    model_dir = os.path.join(root, "model")
    build_model(name, seed, model_dir)
    adirs = adapter_dirs_for(root)
    for k, an in enumerate(ADAPTER_SPECS):
        build_adapter(model_dir, an, seed * 100 + k + 1, adirs[an])
    vocab = MODEL_SPECS[name]["config"]["vocab_size"]
    reqs = make_requests(vocab, seed + 7)

    pm = load_peft_model(model_dir, adirs)
    results = run_oracle(model_dir, adirs, reqs, n_decode, _model=pm)
    # Same prompts with the base model, to check each adapter visibly changes greedy tokens.
    base_reqs = [dict(r, adapter=None, id=r["id"] + "_base") for r in reqs if r["adapter"]]
    base_res = {r["id"][: -len("_base")]: r for r in run_oracle(model_dir, adirs, base_reqs, n_decode, _model=pm)}

    differs: dict[str, bool] = {an: False for an in ADAPTER_SPECS}
    token_diff: dict[str, int] = {}
    for r in results:
        if r["adapter"] is None:
            continue
        nd = int((r["greedy_tokens"] != base_res[r["id"]]["greedy_tokens"]).sum())
        token_diff[r["id"]] = nd
        differs[r["adapter"]] |= nd > 0
    min_margin = min(r["min_margin"] for r in results)
    ok = min_margin >= MIN_MARGIN and all(differs.values())
    info = {
        "seed": seed,
        "results": results,
        "requests": reqs,
        "min_margin": min_margin,
        "adapter_changes_greedy": differs,
        "tokens_differing_from_base": token_diff,
        "model": pm,
    }
    return ok, info


def write_oracle(root: str, info: dict, n_decode: int, command: str, name: str) -> None:
    import numpy as np

    arrays: dict[str, Any] = {}
    for r in info["results"]:
        arrays[f"{r['id']}/prefill_logits"] = r["prefill_logits"]
        arrays[f"{r['id']}/greedy_tokens"] = r["greedy_tokens"]
        arrays[f"{r['id']}/decode_logits"] = r["decode_logits"]
    np.savez(os.path.join(root, "oracle.npz"), **arrays)
    _write_json(os.path.join(root, "requests.json"), info["requests"])

    # KV-cache path vs one full no-cache forward: the size of float noise in this oracle.
    pm = info["model"]
    cache_vs_full = 0.0
    for r, req in zip(info["results"], info["requests"]):
        if req["adapter"] is None:
            with pm.disable_adapter():
                full = recompute_without_cache(pm, req["prompt_token_ids"], r["greedy_tokens"])
        else:
            pm.set_adapter(req["adapter"])
            full = recompute_without_cache(pm, req["prompt_token_ids"], r["greedy_tokens"])
        cache_vs_full = max(cache_vs_full, float(np.abs(full - r["decode_logits"]).max()))

    meta = {
        "model": name,
        "versions": _versions(),
        "command": command,
        "n_decode": n_decode,
        "dtype": "float32",
        "attn_implementation": "eager",
        "seed": info["seed"],
        "init": {"std": INIT_STD, "norm_jitter": NORM_JITTER, "final_norm_gain": LOGIT_GAIN},
        "min_margin_required": MIN_MARGIN,
        "min_margin": info["min_margin"],
        "margins": {
            r["id"]: {"adapter": r["adapter"], "min_top1_minus_top2": r["min_margin"], "at_step": r["min_margin_step"]}
            for r in info["results"]
        },
        "max_abs_logit": float(max(np.abs(r["decode_logits"]).max() for r in info["results"])),
        "max_abs_diff_kv_cache_vs_no_cache": cache_vs_full,
        "adapter_changes_greedy": info["adapter_changes_greedy"],
        "tokens_differing_from_base_same_prompt": info["tokens_differing_from_base"],
        "adapters": {an: ADAPTER_SPECS[an] for an in ADAPTER_SPECS},
    }
    _write_json(os.path.join(root, "oracle_meta.json"), meta)


def generate(out: str, n_decode: int, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name, spec in MODEL_SPECS.items():
        final = os.path.join(out, name)
        for trial in range(MAX_TRIALS):
            seed = spec["seed"] + trial
            tmp = tempfile.mkdtemp(prefix=f"{name}_", dir=out)
            ok, info = try_build(name, seed, tmp, n_decode)
            print(
                f"[{name}] seed {seed}: min margin {info['min_margin']:.4g}, "
                f"adapters change greedy: {info['adapter_changes_greedy']} -> {'OK' if ok else 'retry'}",
                flush=True,
            )
            if ok:
                write_oracle(tmp, info, n_decode, command, name)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(tmp, final)
                for r in info["results"]:
                    print(
                        f"    {r['id']} adapter={r['adapter']!s:15} len={r['prefill_logits'].shape[0]:2d} "
                        f"min margin {r['min_margin']:.4f} (step {r['min_margin_step']}) "
                        f"tokens {r['greedy_tokens'][:8].tolist()}...",
                        flush=True,
                    )
                break
            shutil.rmtree(tmp)
        else:
            raise SystemExit(f"{name}: no seed in {MAX_TRIALS} trials met the conditions")


# --------------------------------------------------------------------------------------
# Self-check on the saved fixtures
# --------------------------------------------------------------------------------------


def check(out: str) -> bool:
    """Re-run the oracle from the saved folders; compare bit-for-bit with oracle.npz, and
    compare base-only requests against the plain HF model (no PEFT at all)."""
    import numpy as np

    all_ok = True
    for name in MODEL_SPECS:
        root = os.path.join(out, name)
        model_dir = os.path.join(root, "model")
        adirs = adapter_dirs_for(root)
        with open(os.path.join(root, "requests.json")) as f:
            reqs = json.load(f)
        with open(os.path.join(root, "oracle_meta.json")) as f:
            n_decode = json.load(f)["n_decode"]
        saved = np.load(os.path.join(root, "oracle.npz"))

        res = run_oracle(model_dir, adirs, reqs, n_decode)
        plain = load_hf_model(model_dir)
        for r, req in zip(res, reqs):
            rid = r["id"]
            for key in ("prefill_logits", "greedy_tokens", "decode_logits"):
                same = np.array_equal(saved[f"{rid}/{key}"], r[key])
                if not same:
                    all_ok = False
                    print(f"[{name}] {rid}/{key}: NOT identical on re-run")
            dec, pre, toks = saved[f"{rid}/decode_logits"], saved[f"{rid}/prefill_logits"], saved[f"{rid}/greedy_tokens"]
            if not (np.array_equal(dec[0], pre[-1]) and np.array_equal(dec.argmax(-1), toks)):
                all_ok = False
                print(f"[{name}] {rid}: internal consistency failed")
            if req["adapter"] is None:
                p = _greedy(plain, req["prompt_token_ids"], n_decode)
                for key in ("prefill_logits", "greedy_tokens", "decode_logits"):
                    if not np.array_equal(p[key], saved[f"{rid}/{key}"]):
                        d = np.abs(p[key].astype(np.float64) - saved[f"{rid}/{key}"]).max()
                        all_ok = False
                        print(f"[{name}] {rid}/{key}: base request != plain HF model (max abs diff {d:.3g})")
                print(f"[{name}] {rid}: base-only request == plain HF model (bitwise)")
        print(f"[{name}] re-run of {len(reqs)} requests: {'identical' if all_ok else 'MISMATCH'}")
        all_ok &= check_manual_merge(model_dir, adirs, reqs, saved)
    return all_ok


def check_manual_merge(model_dir: str, adirs: dict[str, str], reqs: list[dict], saved, atol: float = 1e-4) -> bool:
    """Convention check independent of PEFT's forward: W' = W + s * B @ A read straight
    from adapter_model.safetensors (s = alpha/r, or alpha/sqrt(r) with use_rslora), merged
    into a plain HF model; prefill logits must match the oracle to ``atol``."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    ok = True
    for rname, adir in adirs.items():
        with open(os.path.join(adir, "adapter_config.json")) as f:
            acfg = json.load(f)
        r, alpha = acfg["r"], acfg["lora_alpha"]
        s = alpha / (r**0.5) if acfg.get("use_rslora") else alpha / r
        sd = load_file(os.path.join(adir, "adapter_model.safetensors"))
        model = load_hf_model(model_dir)
        params = dict(model.named_parameters())
        prefix = "base_model.model."
        with torch.no_grad():
            for key, a in sd.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                b = sd[key.replace(".lora_A.", ".lora_B.")]  # [out, r]; a is [r, in]
                target = key[len(prefix) : -len(".lora_A.weight")] + ".weight"
                params[target].add_(s * (b.double() @ a.double()).float())
        worst = 0.0
        for req in reqs:
            if req["adapter"] != rname:
                continue
            with torch.inference_mode():
                lg = model(input_ids=torch.tensor([req["prompt_token_ids"]])).logits[0].numpy()
            worst = max(worst, float(np.abs(lg - saved[f"{req['id']}/prefill_logits"]).max()))
        good = worst <= atol
        ok &= good
        print(f"    manual merge W + {s:.4g}*B@A for {rname}: max |dlogit| {worst:.2e} {'ok' if good else 'FAIL'}")
    return ok


def live(root: str, out: str, n_decode: int) -> int:
    """Rerun HF + PEFT on committed fixture folders (used by tests/test_oracle.py)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    with open(os.path.join(root, "requests.json")) as f:
        reqs = json.load(f)
    adir = os.path.join(root, "adapters")
    adapters = {n: os.path.join(adir, n) for n in sorted(os.listdir(adir))}
    res = run_oracle(os.path.join(root, "model"), adapters, reqs, n_decode)
    arrays = {f"{r['id']}/{k}": np.asarray(r[k])
              for r in res for k in ("prefill_logits", "greedy_tokens", "decode_logits")}
    np.savez(out, **arrays)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="output folder (default: tests/fixtures)")
    ap.add_argument("--n-decode", type=int, default=N_DECODE, help=f"greedy tokens per request (default {N_DECODE})")
    ap.add_argument("--check-only", action="store_true", help="only re-run the oracle on existing fixtures and compare")
    ap.add_argument("--no-check", action="store_true", help="skip the re-run check after generating")
    ap.add_argument("--live", metavar="ROOT", help="run the oracle now on an existing fixture "
                    "folder (ROOT/model, ROOT/adapters, ROOT/requests.json) and write --live-out")
    ap.add_argument("--live-out", metavar="NPZ", help="output of --live, same keys as oracle.npz")
    args = ap.parse_args(argv)
    if args.live:
        return live(args.live, args.live_out, args.n_decode)

    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # same reduction order on every machine / run

    if not args.check_only:
        command = " ".join(shlex.quote(a) for a in [".venv-oracle/bin/python", "tests/oracle/make_fixtures.py"] + sys.argv[1:])
        generate(args.out, args.n_decode, command)
    if args.check_only or not args.no_check:
        return 0 if check(args.out) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
