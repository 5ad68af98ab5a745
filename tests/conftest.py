"""Shared fixtures: tiny random models (MHA and GQA with odd sizes) and engines."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    # One JAX compilation cache per test run, shared by its xdist workers (they inherit the
    # controller's environment): a tiny model's step compiled by one module or worker is
    # loaded by the others (tests of the server's own cache set theirs). Each run starts
    # empty, as on a clean clone.
    if "SLORA_TEST_JAX_CACHE" not in os.environ:
        os.environ["SLORA_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="slora-jax-tests-")
        config._slora_cache_owner = True
    jax.config.update("jax_compilation_cache_dir", os.environ["SLORA_TEST_JAX_CACHE"])


def pytest_unconfigure(config):
    if getattr(config, "_slora_cache_owner", False):
        shutil.rmtree(os.environ.pop("SLORA_TEST_JAX_CACHE"), ignore_errors=True)


from slora_jax.config import EngineConfig, ModelConfig  # noqa: E402
from slora_jax.params import init_dummy_params  # noqa: E402

TINY = {
    "mha": ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=88, num_layers=2,
                       num_heads=4, num_kv_heads=4, head_dim=8, name="tiny-mha"),
    "gqa": ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=100, num_layers=2,
                       num_heads=6, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                       name="tiny-gqa"),
}


def tiny_engine_config(**kw) -> EngineConfig:
    base = dict(page_size=4, num_pages=1024, max_rank=16, max_batch=32, max_prefill_tokens=128,
                max_prefill_requests=8, max_context=64, max_adapters_per_batch=16)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request):
    mc = TINY[request.param]
    return mc, init_dummy_params(mc, jnp.float32, seed=1, std=0.25)


@pytest.fixture(scope="session", params=["gqa", pytest.param("mha", marks=pytest.mark.slow)])
def tiny_gqa_first(request):
    """`tiny` for the costlier checks: the MHA model with -m slow."""
    mc = TINY[request.param]
    return mc, init_dummy_params(mc, jnp.float32, seed=1, std=0.25)
