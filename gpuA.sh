set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 SLORA_COMMIT=$1
JAX_PLATFORMS=cuda timeout 260 python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_kernels.py tests/test_pallas_step.py > $OUT/gpu_tests.log 2>&1
grep -E "PASSED|FAILED|passed|failed|^E  " $OUT/gpu_tests.log | head -40
timeout 320 python3 benchmarks/e2e_decode.py --preset llama-7b --batches 32:512,128:512 --adapters 1,32,128 --iters 10 \
    --lora-backend pallas --attention-backend pallas --out $OUT 2>&1 | grep -v "^|"
