#!/usr/bin/env bash
# One device call: focused GPU kernel tests, then the attention benchmark, most important sections first. Each part
# has its own time limit and the benchmark writes its JSON after every section, so a cut-off run still reports.
# Usage on a GPU machine: bash benchmarks/gpu_check.sh   (results in $OUT, or ./gpu_out)
set -u -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the GPU image lacks (beartype)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/gpu.txt"
git status --short 2>/dev/null | head -20 | tee -a "$OUT/gpu.txt"
PALM_TEST_DEVICE=cuda PALM_TRITON_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider \
  ${TEST_ARGS:-tests/test_kernels.py tests/test_attention_backends.py} 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-380} python3 benchmarks/bench_attention.py ${BENCH_ARGS:---sections rotary,train,attention,decode} \
  --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.log"
