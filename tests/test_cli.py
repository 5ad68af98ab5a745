"""`slora-jax generate` end to end on real HF/PEFT folders, bad lines included."""

import json
import os

from serving.cli import main

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gqa")
ADAPTERS = sorted(os.listdir(os.path.join(FIX, "adapters"))) if os.path.isdir(
    os.path.join(FIX, "adapters")) else []


def engine_flags(tmp_path) -> list[str]:
    """One engine configuration (one bucket of each kind) for `generate` and the server in
    this module: the steps compile once per pytest worker."""
    (tmp_path / "s.yaml").write_text(
        "engine: {max_adapters_per_batch: %d, max_prefill_requests: 1, decode_buckets: [8],"
        " prefill_token_buckets: [64]}\nscheduler: {base_only_steps: false}\n" % len(ADAPTERS))
    return ["--dtype", "float32", "--max-batch", "8", "--max-context", "64", "--page-size", "4",
            "--max-rank", "16", "--num-pages", "512", "--max-prefill-tokens", "64",
            "--config", str(tmp_path / "s.yaml")]


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
               "--out", str(out), "--quiet", *engine_flags(tmp_path)])
    assert rc == 0
    res = {d["id"]: d for d in map(json.loads, out.read_text().splitlines())}
    import numpy as np
    oracle = np.load(os.path.join(FIX, "oracle.npz"))
    for r in reqs:
        assert res[r["id"]]["token_ids"] == [int(t) for t in oracle[f"{r['id']}/greedy_tokens"][:6]]
        assert len(res[r["id"]]["logprobs"]) == 6
    assert "in.jsonl:5" in res["line-5"]["error"]
    assert "needs a model folder with tokenizer.json" in res["text"]["error"]
    assert "`nope` does not exist" in res["unk"]["error"]


def test_generate_bad_model_dir(tmp_path, caplog):
    (tmp_path / "in.jsonl").write_text("")
    rc = main(["generate", "--model", str(tmp_path), "--requests", str(tmp_path / "in.jsonl"),
               "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert "no config.json" in caplog.text


def test_generate_config_errors_name_the_key(tmp_path, caplog):
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "s.yaml").write_text("engine: {max_batch: 4, decode_bucket: [4]}\n")
    rc = main(["generate", "--model", os.path.join(FIX, "model"), "--requests",
               str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"),
               "--config", str(tmp_path / "s.yaml")])
    assert rc == 2
    assert "unknown keys ['decode_bucket'] in section 'engine'" in caplog.text


def test_generate_equals_the_server(tmp_path):
    """The offline CLI and the HTTP server run the same engine: the same requests give the
    same tokens, greedy and seeded, and a line's n samples are the server's n choices."""
    import httpx

    from serving.bootstrap import build, build_parser
    from serving.server import ServerThread, create_app
    with open(os.path.join(FIX, "requests.json")) as f:
        reqs = json.load(f)[:6]
    samplings = [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.8, "seed": 11},
                 {"temperature": 1.3, "top_k": 5, "seed": 3}]
    lines = [{"id": f"{r['id']}-{j}", "adapter": r["adapter"], "max_tokens": 7,
              "prompt_token_ids": r["prompt_token_ids"], "ignore_eos": True, **s}
             for r in reqs for j, s in enumerate(samplings)]
    lines += [{**line, "id": f"{line['id']}-n3", "n": 3} for line in lines[1:3]]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(map(json.dumps, lines)) + "\n")
    adapters = [f"--adapter={n}={os.path.join(FIX, 'adapters', n)}"
                for n in sorted(os.listdir(os.path.join(FIX, "adapters")))]
    flags = engine_flags(tmp_path)     # the server runs the steps `generate` compiled
    assert main(["generate", "--model", os.path.join(FIX, "model"), *adapters, "--requests",
                 str(inp), "--out", str(out), "--quiet", *flags]) == 0
    offline = {(d["id"], d.get("index", 0)): d["token_ids"]
               for d in map(json.loads, out.read_text().splitlines())}
    assert len(offline) == len(lines) + 2 * 2                   # two lines of 3 samples

    engine, codec, name, _ = build(build_parser().parse_args(
        ["--model", os.path.join(FIX, "model"), "--adapters", os.path.join(FIX, "adapters"),
         "--compile-cache", "none", *flags]))
    compiled = engine._cache_sizes()
    engine.start()
    server = ServerThread(create_app(engine, codec, name)).start()
    try:
        for d in lines:
            body = {k: v for k, v in d.items() if k not in ("id", "adapter", "prompt_token_ids")}
            r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                **body, "model": d["adapter"] or name, "prompt": d["prompt_token_ids"]})
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
            assert len(choices) == d.get("n", 1)
            for c in choices:
                assert [int(t) for t in c["text"].split()] == offline[(d["id"], c["index"])]
        assert engine._cache_sizes() == compiled      # no step compiled for the server
    finally:
        server.stop()
        engine.shutdown()
