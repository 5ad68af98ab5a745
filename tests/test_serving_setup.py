"""Shared set-up of the serving tests, and tests of the server's configuration.

Every serving test module builds its engine from `engine_config()` and the
same tiny GQA model, so the step functions compile once per pytest process
(JAX's jit cache is keyed by the static spec and the shapes) and later
modules start in well under a second. The pool is deliberately too small
for all 16 adapters and 64 requests at once: every module runs under
memory pressure.
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import pytest

from conftest import TINY
from serving.adapter_store import StoreConfig, save_peft_adapter
from serving.engine import Engine
from serving.scheduler import SchedulerConfig
from slora_jax.adapters import dummy_adapter, load_peft_adapter
from slora_jax.config import EngineConfig
from slora_jax.params import init_dummy_params

MC = TINY["gqa"]
ALL = ("q", "k", "v", "o", "gate", "up", "down")
# 16 adapters: ranks 1..16, attention-only, MLP-only and all-module targets.
ADAPTER_SPECS = [(r, mods) for r, mods in [
    (1, ("q", "v")), (2, ALL), (4, ("gate", "up", "down")), (8, ("q", "k", "v", "o")),
    (16, ALL), (2, ("o", "down")), (4, ALL), (8, ("k", "up")),
    (1, ALL), (16, ("q", "v")), (4, ("q", "v")), (8, ALL),
    (2, ("gate",)), (16, ("o", "down")), (1, ("up", "down")), (4, ("q", "k", "v", "o")),
]]


def engine_config(**kw) -> EngineConfig:
    base = dict(page_size=4, num_pages=110, max_rank=16, max_batch=16, max_prefill_tokens=64,
                max_prefill_requests=4, max_context=48, max_adapters_per_batch=8,
                decode_buckets=(16,), prefill_token_buckets=(64,))
    base.update(kw)
    return EngineConfig(**base)


@functools.lru_cache(maxsize=1)
def params():
    return init_dummy_params(MC, jnp.float32, seed=1, std=0.25)


def write_adapters(root: str) -> dict:
    """Save ADAPTER_SPECS as PEFT folders a00..a15 under root; return them as loaded back."""
    out = {}
    for i, (r, mods) in enumerate(ADAPTER_SPECS):
        name = f"a{i:02d}"
        ad = dummy_adapter(MC, r, mods, seed=100 + i, std=0.3, alpha=2.0 * r, name=name)
        save_peft_adapter(ad, os.path.join(root, name))
        out[name] = load_peft_adapter(os.path.join(root, name), MC)
    return out


def make_engine(adapter_root: str | None = None, *, sched: dict | None = None,
                store: dict | None = None, **ec_kw) -> Engine:
    """A warm, started engine over the tiny model, with the adapters under adapter_root."""
    cfg = SchedulerConfig(**{"base_only_steps": False, **(sched or {})})
    roots = (adapter_root,) if adapter_root else ()
    eng = Engine(params(), MC, engine_config(**ec_kw), dtype=jnp.float32, config=cfg,
                 store_config=StoreConfig(**{"allowed_roots": roots, **(store or {})}))
    if adapter_root:
        eng.store.register_dir(adapter_root)
    eng.warmup(progress=False)
    return eng.start()


# --- configuration -------------------------------------------------------------------

def test_yaml_config_and_flags_merge(tmp_path):
    from serving.bootstrap import build_parser, resolve
    y = tmp_path / "s.yaml"
    y.write_text("engine: {page_size: 4, max_batch: 8, decode_buckets: [4, 8]}\n"
                 "scheduler: {max_queue: 7}\nstore: {host_cache_mb: 3}\n"
                 "server: {port: 9, dtype: float32}\n")
    args = build_parser().parse_args(["--dummy", "tiny", "--config", str(y), "--max-batch", "4",
                                      "--ttft-slo", "2.5"])
    cfg = resolve(args)
    assert cfg["engine"]["max_batch"] == 4 and cfg["engine"]["page_size"] == 4
    assert cfg["engine"]["decode_buckets"] == (4, 8)
    assert cfg["scheduler"] == {"max_queue": 7, "ttft_slo_s": 2.5}
    assert cfg["store"] == {"host_cache_bytes": 3 << 20}
    assert cfg["server"]["port"] == 9 and cfg["server"]["host"] == "127.0.0.1"


def test_yaml_unknown_key_is_named(tmp_path):
    from serving.bootstrap import build_parser, resolve
    y = tmp_path / "s.yaml"
    y.write_text("scheduler: {max_qeue: 7}\n")
    args = build_parser().parse_args(["--dummy", "tiny", "--config", str(y)])
    with pytest.raises(ValueError, match="max_qeue"):
        resolve(args)


def test_kv_pages_mode_is_checked(tmp_path):
    """A misspelt `kv_pages` mode is a config error naming the field and its values."""
    from serving.bootstrap import build_parser, resolve
    y = tmp_path / "s.yaml"
    y.write_text("scheduler: {kv_pages: lazy}\n")
    cfg = resolve(build_parser().parse_args(["--dummy", "tiny", "--config", str(y)]))
    with pytest.raises(ValueError, match="kv_pages: 'lazy' is not one of on_demand, reserve"):
        SchedulerConfig(**cfg["scheduler"])
    assert SchedulerConfig().kv_pages == "on_demand"


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(
    os.path.dirname(__file__), "..", "configs", "server"))))
def test_shipped_server_configs_resolve(name):
    from serving.bootstrap import build_parser, resolve
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "server", name)
    cfg = resolve(build_parser().parse_args(["--dummy", "tiny", "--config", path]))
    EngineConfig(**{**cfg["engine"], "num_pages": 2})
    SchedulerConfig(**cfg["scheduler"])


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(
    os.path.dirname(__file__), "..", "configs", "server"))))
def test_shipped_server_configs_are_valid(name):
    """Every config under configs/server resolves into valid engine and scheduler configs
    whose buckets reach max_batch and max_prefill_tokens (what the engine checks at start)."""
    from serving.bootstrap import build_parser, resolve
    from slora_jax.config import EngineConfig
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "server", name)
    cfg = resolve(build_parser().parse_args(["--dummy", "tiny", "--config", path]))
    SchedulerConfig(**cfg["scheduler"])
    ec = EngineConfig(**{k: v for k, v in cfg["engine"].items() if k != "num_pages"},
                      num_pages=1024)
    assert ec.batch_buckets()[-1] >= ec.max_batch
    assert ec.token_buckets()[-1] >= ec.max_prefill_tokens


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "lots"])
def test_a_compile_cache_bound_that_is_not_a_positive_size_is_refused(bad, capsys):
    from serving.bootstrap import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--compile-cache-gb", bad])
    assert "--compile-cache-gb: must be a positive number of GB" in capsys.readouterr().err
    assert build_parser().parse_args(["--compile-cache-gb", "0.5"]).compile_cache_gb == 0.5
