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
from serving.server import ServerThread, create_app

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gqa")
N_TOKENS = 16
YAML = """engine: {page_size: 4, num_pages: 256, max_rank: 16, max_batch: 16, max_prefill_tokens: 32,
         max_prefill_requests: 4, max_context: 64, decode_buckets: [16],
         prefill_token_buckets: [32]}
scheduler: {base_only_steps: false}
"""


@pytest.mark.skipif(not os.path.isdir(os.path.join(FIX, "adapters")),
                    reason="HF/PEFT oracle fixtures not generated")
def test_http_greedy_tokens_match_hf_peft_oracle(tmp_path):
    (tmp_path / "s.yaml").write_text(YAML)
    args = build_parser().parse_args(["--model", os.path.join(FIX, "model"), "--adapters",
                                      os.path.join(FIX, "adapters"), "--dtype", "float32",
                                      "--config", str(tmp_path / "s.yaml")])
    engine, codec, name, _ = build(args)
    engine.warmup(progress=False)
    engine.start()
    server = ServerThread(create_app(engine, codec, name)).start()
    with open(os.path.join(FIX, "requests.json")) as f:
        reqs = json.load(f)
    oracle = np.load(os.path.join(FIX, "oracle.npz"))

    async def fire():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json={
                "model": r["adapter"] or name, "prompt": r["prompt_token_ids"],
                "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}) for r in reqs))
    try:
        outs = asyncio.run(fire())
    finally:
        server.stop()
        engine.shutdown()
    for r, out in zip(reqs, outs):
        assert out.status_code == 200, out.text
        got = [int(t) for t in out.json()["choices"][0]["text"].split()]
        want = [int(t) for t in oracle[f"{r['id']}/greedy_tokens"][:N_TOKENS]]
        assert got == want, (r["id"], r["adapter"])
