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
	$(PY) -m pip install -q -e ".[test,gguf,train,bench]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# On a CUDA machine (see benchmarks/README.md for the device-tool command); -v names each
# test as it ends, so a run cut short still says what passed. GPU_WORKERS=4 compiles on four
# pytest workers sharing the GPU (each allocating as it goes, up to a fifth of its memory).
GPU_WORKERS ?= 0
GPU_SHARE := $(if $(filter-out 0,$(GPU_WORKERS)),XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.2)
test-gpu:
	JAX_PLATFORMS=cuda $(GPU_SHARE) $(PY) -m pytest -m gpu -n $(GPU_WORKERS) -p no:cacheprovider -v $(ARGS)

serve: install
	$(PY) -m serving.server $(ARGS)

bench-kernels:
	$(PY) benchmarks/kernels.py $(ARGS)

# GPU benchmarks (benchmarks/PERF.md says what each measures). Results go to $(OUT); on the
# GPU image without the venv: make bench-e2e PY=python3.
OUT     ?= benchmarks/results
GPU_ENV := XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONUNBUFFERED=1
# The serving benchmarks' compiled steps, inside the checkout (ignored), so a later run on the
# same machine starts warm.
COMPILE_CACHE ?= .cache/jax

.PHONY: bench-e2e bench-tune bench-serve bench-saturation bench-overhead plot-saturation

bench-e2e:
	$(GPU_ENV) $(PY) benchmarks/e2e_decode.py --preset llama-7b --lora-backend pallas \
	  --attention-backend pallas --batches 1:512,32:512,128:512,256:256 --adapters 1,32,128 \
	  --iters 10 --out $(OUT) $(ARGS)

bench-tune:
	$(GPU_ENV) $(PY) benchmarks/tune_lora.py --out $(OUT) $(ARGS)

bench-serve:
	$(GPU_ENV) $(PY) benchmarks/serve_load.py --dummy llama-7b \
	  --config configs/server/llama-7b-bench.yaml --dummy-adapters 1000 --dummy-ranks 8 \
	  --preload --rate 8 --duration 45 --input-range 8,256 --output-range 8,256 \
	  --compile-cache $(COMPILE_CACHE) --out-dir $(OUT) $(ARGS)

# One sweep per server configuration, e.g. ARGS="--dummy-adapters 1000 --dummy-ranks 8".
bench-saturation:
	$(GPU_ENV) $(PY) benchmarks/serve_load.py --dummy llama-7b \
	  --config configs/server/saturation.yaml --dummy-adapters 2000 --dummy-ranks 8 --preload \
	  --sweep 10,16,20,24,28,32,36,40 --sweep-adapters 0,1000,2000,100,5 --duration 60 \
	  --input-range 8,512 --output-range 8,512 --compile-cache $(COMPILE_CACHE) \
	  --out-dir $(OUT) $(ARGS)

# The sweep's figure (PNG beside the JSON): FILE=benchmarks/results/saturation_<device>_<commit>.json
plot-saturation:
	$(PY) benchmarks/plot_saturation.py $(FILE)

bench-overhead:
	$(GPU_ENV) $(PY) benchmarks/serve_overhead.py --dummy llama-7b \
	  --config configs/server/llama-7b-bench.yaml --out $(OUT) $(ARGS)

# Regenerate the HF + PEFT oracle fixtures (needs torch, transformers, peft).
fixtures:
	$(VENV)-oracle/bin/python tests/oracle/make_fixtures.py

clean:
	rm -rf $(VENV) .pytest_cache
