"""`python -m serving.server` as an operator runs it: a subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from serving.adapter_store import save_peft_adapter
from serving.server import main as serve_main
from slora_jax.adapters import dummy_adapter
from slora_jax.config import preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One bucket per kind: the subprocess compiles 3 shapes, not the 9 of configs/server/tiny.yaml.
YAML = """engine: {page_size: 4, num_pages: 256, max_rank: 16, max_batch: 8, max_prefill_tokens: 32,
         max_prefill_requests: 2, max_context: 64, decode_buckets: [8],
         prefill_token_buckets: [32]}
scheduler: {base_only_steps: false}
server: {dtype: float32}
"""


def test_serve_subprocess_with_2000_adapters(tmp_path):
    mc = preset("tiny")
    for i, r in enumerate([2, 8]):
        save_peft_adapter(dummy_adapter(mc, r, ("q", "v"), seed=i, name=f"peft{i}"),
                          str(tmp_path / "adapters" / f"peft{i}"))
    (tmp_path / "s.yaml").write_text(YAML)
    cmd = [sys.executable, "-m", "serving.server", "--dummy", "tiny", "--config",
           str(tmp_path / "s.yaml"), "--port", "0", "--adapters", str(tmp_path / "adapters"),
           "--dummy-adapters", "2000", "--dummy-ranks", "4,8", "--preload",
           "--compile-cache", str(tmp_path / "jax-cache")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines: list[str] = []
    found = threading.Event()
    url = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url.append(m.group(1))
                found.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(180), "".join(lines[-20:])
        u = url[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{u}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        models = httpx.get(f"{u}/v1/models").json()["data"]
        assert len(models) == 1 + 2 + 2000 and models[0]["id"] == "tiny"
        for model in ("peft1", "lora-1999", "tiny"):
            r = httpx.post(f"{u}/v1/completions", json={"model": model, "prompt": "1 2 3",
                                                        "max_tokens": 4, "temperature": 0,
                                                        "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["text"].split()) == 4
        r = httpx.post(f"{u}/v1/load_lora_adapter",
                       json={"lora_name": "x", "lora_path": "/etc"})
        assert r.status_code == 403
        # --preload filled host RAM (during the warm-up) before /health said ready, and the
        # start-up phases reached Prometheus from the engine process.
        metrics = httpx.get(f"{u}/metrics").text
        assert re.search(r'^slora_adapters\{tier="host"\} 2002\.0$', metrics, re.M), metrics
        phases = {m[1]: float(m[2]) for m in re.finditer(
            r'^slora_startup_seconds\{phase="([^"]+)"\} (\S+)$', metrics, re.M)}
        assert set(phases) == {"process", "params", "engine", "adapters", "warmup", "preload",
                               "total"}, metrics
        assert all(v >= 0 for v in phases.values()) and phases["warmup"] > 0
        assert abs(phases["total"] - sum(v for k, v in phases.items() if k != "total")) < 1e-6
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, "".join(lines[-20:])
    assert any("registered 2 adapters" in x for x in lines)


def test_serve_help_and_bad_config(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        serve_main(["--help"])
    assert e.value.code == 0 and "--dummy-adapters" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {page_sise: 4}\n")
    assert serve_main(["--dummy", "tiny", "--config", str(bad)]) == 2


def test_benchmark_help():
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "serve_load.py"),
                          "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--alpha" in out.stdout and "--cv" in out.stdout
