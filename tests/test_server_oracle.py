"""The server, built from real HF + PEFT folders by the `serve` command's own builder, against
the HF + PEFT oracle: concurrent HTTP requests give the oracle's greedy tokens.

Skipped when tests/fixtures/tiny_gqa is absent. The oracle's top-1/top-2 margins are at
least 0.015 (oracle_meta.json); float32 with "highest" matmul precision stays far within.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import numpy as np
import pytest

from serving.bootstrap import build, build_parser
from serving.engine import Engine
from serving.server import ServerThread, create_app

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gqa")
N_TOKENS = 16
YAML = """engine: {page_size: 4, num_pages: 256, max_rank: 16, max_batch: 16, max_prefill_tokens: 32,
         max_prefill_requests: 4, max_context: 64, decode_buckets: [16],
         prefill_token_buckets: [32], max_adapters_per_batch: 16}
scheduler: {base_only_steps: false}
"""


needs_fixtures = pytest.mark.skipif(not os.path.isdir(os.path.join(FIX, "adapters")),
                                    reason="HF/PEFT oracle fixtures not generated")


def serve_oracle_requests(tmp_path, yaml: str) -> dict[str, list[int]]:
    """Every oracle request at once through a real server built from `yaml`: greedy tokens."""
    (tmp_path / "s.yaml").write_text(yaml)
    args = build_parser().parse_args(["--model", os.path.join(FIX, "model"), "--adapters",
                                      os.path.join(FIX, "adapters"), "--dtype", "float32",
                                      "--config", str(tmp_path / "s.yaml"),
                                      # in-process, the cache would be this pytest worker's
                                      # for all its later tests (and in the user's home)
                                      "--compile-cache", "none"])
    engine, codec, name, _ = build(args)
    engine.warmup(progress=False)
    engine.start()
    server = ServerThread(create_app(engine, codec, name)).start()

    async def fire():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json={
                "model": r["adapter"] or name, "prompt": r["prompt_token_ids"],
                "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True})
                for r in oracle_requests()))
    try:
        outs = asyncio.run(fire())
        assert engine.compiled_since_warmup() == {k: 0 for k in engine.compiled_since_warmup()}
    finally:
        server.stop()
        engine.shutdown()
    got = {}
    for r, out in zip(oracle_requests(), outs):
        assert out.status_code == 200, out.text
        got[r["id"]] = [int(t) for t in out.json()["choices"][0]["text"].split()]
    return got


def oracle_requests() -> list[dict]:
    with open(os.path.join(FIX, "requests.json")) as f:
        return json.load(f)


def oracle_tokens(rid: str) -> list[int]:
    oracle = np.load(os.path.join(FIX, "oracle.npz"))
    return [int(t) for t in oracle[f"{rid}/greedy_tokens"][:N_TOKENS]]


# In the default run, the oracle's greedy tokens go through the in-process server in the
# chunked test below and through the process-split server (tests/test_process_split.py).
@pytest.mark.slow
@needs_fixtures
def test_http_greedy_tokens_match_hf_peft_oracle(tmp_path):
    got = serve_oracle_requests(tmp_path, YAML)
    for r in oracle_requests():
        assert got[r["id"]] == oracle_tokens(r["id"]), (r["id"], r["adapter"])


@needs_fixtures
def test_prompts_prefilled_in_chunks_match_the_oracle_through_server_and_generate(tmp_path):
    """max_prefill_tokens 2: every prompt but the two of one token (3 to 17 tokens) is
    prefilled over several steps beside other requests' decode rows and chunks, adapters
    of several ranks mixed; the server and `slora-jax generate` give the oracle's tokens."""
    from serving.cli import main
    assert sorted(len(r["prompt_token_ids"]) for r in oracle_requests())[2] > 2
    chunked = YAML.replace("max_prefill_tokens: 32", "max_prefill_tokens: 2").replace(
        "prefill_token_buckets: [32]", "prefill_token_buckets: [2]")
    got = serve_oracle_requests(tmp_path, chunked)
    for r in oracle_requests():
        assert got[r["id"]] == oracle_tokens(r["id"]), (r["id"], r["adapter"])

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": r["id"], "adapter": r["adapter"],
                                       "prompt_token_ids": r["prompt_token_ids"],
                                       "max_tokens": N_TOKENS, "ignore_eos": True}) + "\n"
                           for r in oracle_requests()))
    adapters = [f"--adapter={n}={os.path.join(FIX, 'adapters', n)}"
                for n in sorted(os.listdir(os.path.join(FIX, "adapters")))]
    # the server's configuration file: `generate` runs the steps the server compiled
    compiled = Engine._cache_sizes()
    assert main(["generate", "--model", os.path.join(FIX, "model"), *adapters, "--requests",
                 str(inp), "--out", str(out), "--quiet", "--dtype", "float32",
                 "--config", str(tmp_path / "s.yaml")]) == 0
    assert Engine._cache_sizes() == compiled
    offline = {d["id"]: d["token_ids"] for d in map(json.loads, out.read_text().splitlines())}
    assert offline == got
