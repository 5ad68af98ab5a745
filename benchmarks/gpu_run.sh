#!/usr/bin/env bash
# One device-tool call: install carried wheels (fastapi/uvicorn/pydantic are not on the
# GPU image), then run a benchmark with the repo on PYTHONPATH. Usage:
#   bash benchmarks/gpu_run.sh e2e     # benchmarks/e2e_decode.py, Llama-7B dummy
#   bash benchmarks/gpu_run.sh serve   # benchmarks/serve_load.py, 100 then 1000 adapters
#   bash benchmarks/gpu_run.sh pallas  # GPU tests of the kernels and of the Pallas step, then
#                                      # the e2e step with the Pallas backends (4 layers, then 32)
#   bash benchmarks/gpu_run.sh tests   # every `gpu` test (kernels, prefill attention, steps)
#   bash benchmarks/gpu_run.sh kernels # benchmarks/kernels.py, all families
#   bash benchmarks/gpu_run.sh tune    # benchmarks/tune_decode_attention.py (tiling sweep)
#   bash benchmarks/gpu_run.sh variants # e2e with the Pallas backends and the LoRA step
#                                      # options beside the default (StepSpec.lora_sort,
#                                      # lora_out); BATCHES/ADAPTERS/VARIANTS narrow it
#   bash benchmarks/gpu_run.sh ragged  # one call (~9 min): the ragged-split GPU tests, the
#                                      # decode LoRA split sweep at B=32, and kernels.py
#                                      # --only lora (pallas-ragged, pallas-layer rows)
#   bash benchmarks/gpu_run.sh defaults # one call (~9 min): e2e with the measured
#                                      # defaults at B=32/128/256, then kernels.py
#                                      # --only lora-prefill (pallas-layer vs dense)
#   bash benchmarks/gpu_run.sh glue    # one call (~9 min): e2e at B=32/128 with a
#                                      # per-kernel breakdown (what XLA glue is left
#                                      # around the LoRA kernels), then every
#                                      # pallas-layer row against its baselines
#   bash benchmarks/gpu_run.sh small   # one call (~5 min): e2e at B=1..32 with the Pallas
#                                      # backends, 1 and 32 adapters (VARIANTS: step options)
#   bash benchmarks/gpu_run.sh applysweep # one call (~5 min): tune_lora.py --apply-sweep,
#                                      # the whole decode apply (kernels + XLA glue) under
#                                      # each SHRINK_BLOCKS (the shrink's K splits),
#                                      # beside the XLA reference, B = 1..256
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit 1
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUTDIR=${OUT:-benchmarks/results}
case "$1" in
  e2e)
    python3 benchmarks/e2e_decode.py --preset llama-7b --batches "${BATCHES:-32:512,128:512}" \
      --adapters "${ADAPTERS:-32,128}" --iters 10 --out "$OUTDIR" ;;
  serve)
    for n in 100 1000; do
      python3 benchmarks/serve_load.py --dummy llama-7b --config configs/server/llama-7b-bench.yaml \
        --dummy-adapters $n --dummy-ranks 8 --preload --compile-cache /tmp/jax-cache \
        --rate "${RATE:-8}" --duration "${DURATION:-45}" --input-range 8,256 --output-range 8,256 \
        --out-dir "$OUTDIR" --tag "gpu_${n}ad" || exit 1
    done ;;
  pallas)
    JAX_PLATFORMS=cuda timeout "${TEST_S:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_kernels.py tests/test_pallas_step.py 2>&1 | tail -15
    for layers in ${LAYERS:-4 32}; do
      timeout "${E2E_S:-300}" python3 benchmarks/e2e_decode.py --preset llama-7b --layers "$layers" \
        --batches "${BATCHES:-32:512,128:512}" --adapters "${ADAPTERS:-1,32,128}" --iters 10 \
        --lora-backend pallas --attention-backend pallas \
        --breakdown "${BREAKDOWN:-0}" --out "$OUTDIR" 2>&1 | grep -v "^|"
    done ;;
  tests)
    JAX_PLATFORMS=cuda timeout "${TEST_S:-570}" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
      tests/test_kernels.py tests/test_prefill_attention.py tests/test_pallas_step.py 2>&1 | tail -25 ;;
  kernels)
    python3 benchmarks/kernels.py --budget-s "${BUDGET_S:-520}" ${ONLY:+--only "$ONLY"} \
      --out "$OUTDIR/kernels.json" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -90 ;;
  tune)
    python3 benchmarks/tune_decode_attention.py --budget-s "${BUDGET_S:-480}" --out "$OUTDIR" \
      2>&1 | grep "^|" ;;
  variants)
    timeout "${E2E_S:-570}" python3 benchmarks/e2e_decode.py --preset llama-7b \
      --batches "${BATCHES:-32:512}" --adapters "${ADAPTERS:-1,32}" --iters 10 \
      --lora-backend pallas --attention-backend pallas \
      --lora-variants "${VARIANTS:-sort=auto,out=pool,sort=auto+out=pool}" \
      --breakdown "${BREAKDOWN:-0}" --out "$OUTDIR" 2>&1 | grep -v "^|" ;;
  ragged)
    JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
      tests/test_kernels.py -k "ragged or mlp_widths" 2>&1 | tail -5
    timeout 200 python3 benchmarks/tune_lora.py --budget-s 170 --out "$OUTDIR" \
      --shapes llama-7b:qkv:32:32:mixed,llama-7b:o:32:32:mixed 2>&1 | grep "^|" | tail -30
    python3 benchmarks/kernels.py --budget-s 230 --only lora --out "$OUTDIR/kernels_lora.json" \
      2>&1 | sed -n '/^SUMMARY/,$p' | cut -c1-330 ;;
  defaults)
    timeout 330 python3 benchmarks/e2e_decode.py --preset llama-7b \
      --batches "${BATCHES:-32:512,128:512,256:256}" --adapters "${ADAPTERS:-1,32,128}" \
      --iters 10 --lora-backend pallas --attention-backend pallas --out "$OUTDIR" 2>&1 \
      | grep "^B="
    python3 benchmarks/kernels.py --budget-s 200 --only lora-prefill \
      --out "$OUTDIR/kernels_prefill.json" 2>&1 | sed -n '/^SUMMARY/,$p' | cut -c1-330 ;;
  glue)
    timeout 300 python3 benchmarks/e2e_decode.py --preset llama-7b \
      --batches "${BATCHES:-32:512,128:512}" --adapters "${ADAPTERS:-1,32}" --iters 10 \
      --lora-backend pallas --attention-backend pallas --breakdown "${BREAKDOWN:-16}" \
      --out "$OUTDIR" 2>&1 | grep "^B="
    python3 benchmarks/kernels.py --budget-s 220 --only lora,lora-prefill \
      --backends pallas-layer,xla-gather,dense --out "$OUTDIR/kernels_layer.json" 2>&1 \
      | sed -n '/^SUMMARY/,$p' | grep "lora_apply" | cut -c1-200 ;;
  small)
    timeout "${E2E_S:-540}" python3 benchmarks/e2e_decode.py --preset llama-7b \
      --batches "${BATCHES:-1:512,4:512,16:512,32:512}" --adapters "${ADAPTERS:-1,32}" \
      --iters 10 --lora-backend pallas --attention-backend pallas \
      ${VARIANTS:+--lora-variants "$VARIANTS"} --out "$OUTDIR" 2>&1 | grep "^B=" ;;
  applysweep)
    timeout 480 python3 benchmarks/tune_lora.py --apply-sweep --budget-s 430 --iters 20 \
      --shrink-blocks 132,66,33,16,8 --out "$OUTDIR" --shapes "${SHAPES:-\
llama-7b:qkv:32:1:mixed,llama-7b:o:32:1:mixed,llama-7b:qkv:32:32:mixed,llama-7b:o:32:32:mixed,\
llama-7b:qkv:1:1:mixed,llama-7b:qkv:8:8:mixed,llama-7b:qkv:16:16:mixed,llama-7b:qkv:128:1:mixed,\
llama-7b:qkv:128:32:mixed,llama-7b:o:128:32:mixed,llama-7b:o:1:1:mixed,llama-7b:qkv:256:256:mixed}" \
      2>&1 | grep "^|" ;;
  *) echo "usage: $0 e2e|serve|pallas|tests|kernels|tune|variants|ragged|defaults|glue|small|applysweep" >&2
     exit 2 ;;
esac
