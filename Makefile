# slora-jax: `make test` runs the CPU suite, `make serve` starts the server.
PYTHON ?= python
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow test-gpu serve bench-kernels fixtures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,gguf,train]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# On a CUDA machine (see benchmarks/README.md for the device-tool command).
test-gpu:
	JAX_PLATFORMS=cuda $(PY) -m pytest -m gpu -p no:cacheprovider

serve: install
	$(PY) -m serving.server $(ARGS)

bench-kernels:
	$(PY) benchmarks/kernels.py $(ARGS)

# Regenerate the HF + PEFT oracle fixtures (needs torch, transformers, peft).
fixtures:
	$(VENV)-oracle/bin/python tests/oracle/make_fixtures.py

clean:
	rm -rf $(VENV) .pytest_cache
