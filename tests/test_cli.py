"""`slora-jax generate` end to end on real HF/PEFT folders, bad lines included."""

import json
import os

from slora_jax.cli import main

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gqa")


def test_generate_jsonl(tmp_path):
    with open(os.path.join(FIX, "requests.json")) as f:
        reqs = json.load(f)[:4]
    lines = [json.dumps({"id": r["id"], "adapter": r["adapter"], "max_tokens": 6,
                         "prompt_token_ids": r["prompt_token_ids"]}) for r in reqs]
    lines += ["{broken json", json.dumps({"id": "text", "prompt": "hello"}),
              json.dumps({"id": "unk", "adapter": "nope", "prompt_token_ids": [1]})]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    adapters = [f"--adapter={n}={os.path.join(FIX, 'adapters', n)}"
                for n in sorted(os.listdir(os.path.join(FIX, "adapters")))]
    rc = main(["generate", "--model", os.path.join(FIX, "model"), *adapters, "--requests", str(inp),
               "--out", str(out), "--dtype", "float32", "--max-batch", "8", "--max-context", "64",
               "--page-size", "4", "--max-rank", "16", "--quiet"])
    assert rc == 0
    res = {d["id"]: d for d in map(json.loads, out.read_text().splitlines())}
    import numpy as np
    oracle = np.load(os.path.join(FIX, "oracle.npz"))
    for r in reqs:
        assert res[r["id"]]["token_ids"] == [int(t) for t in oracle[f"{r['id']}/greedy_tokens"][:6]]
        assert len(res[r["id"]]["logprobs"]) == 6
    assert "in.jsonl:5" in res["line-5"]["error"]
    assert "needs a model folder with tokenizer.json" in res["text"]["error"]
    assert "unknown adapter 'nope'" in res["unk"]["error"]


def test_generate_bad_model_dir(tmp_path, caplog):
    (tmp_path / "in.jsonl").write_text("")
    rc = main(["generate", "--model", str(tmp_path), "--requests", str(tmp_path / "in.jsonl"),
               "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert "no config.json" in caplog.text
