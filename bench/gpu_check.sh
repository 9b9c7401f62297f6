#!/usr/bin/env bash
# One GPU call: versions, GPU tests, a kernel profile, then the GPU benchmarks; JSON and logs in $OUT,
# tables on stdout (python bench/report.py / report_models.py / floor.py remake them from the JSON).
#   run (device tool): DCN_FAST_COMMIT=<hash> bash bench/gpu_check.sh   (stages bounded to 590 s in all)
# The GPU machine has torch, torchdiffeq, pytest and pytest-benchmark but no
# network: the package is used from the checkout (PYTHONPATH), not installed.
# DCN_FAST_COMMIT names the commit in the JSON where the copy's .git is not current.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Installed, kernels/ is the subpackage dcn_fast.kernels; from a bare checkout a link does that.
python -c "import dcn_fast.kernels" 2>/dev/null || ln -sfn ../kernels dcn_fast/kernels
status=0

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${DCN_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# Each stage is bounded and runs whatever the one before did: a failing test still leaves numbers to read.
# The CUDA dense kernels (about a minute of nvcc for this GPU's arch); without nvcc, dense builds its
# filter with PyTorch ops and the log says why.
timeout 150 python -m dcn_fast.build cuda > "$OUT/build-cuda.log" 2>&1 || status=1
tail -3 "$OUT/build-cuda.log"
timeout 110 python -m pytest -q -rf tests/test_gpu.py tests/test_triton.py \
  tests/test_checkpoint.py::test_cuda_dcn_ode_gradients_and_peak_memory tests/test_checkpoint.py::test_triton_backend \
  > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"
timeout 30 python bench/profile_layer.py > "$OUT/profile.txt" 2>&1 || status=1
cat "$OUT/profile.txt"
# CUDA-graph cases in a process of their own: a failed capture leaves the CUDA context unusable.
timeout 150 python -m pytest bench/test_layer_gpu.py --benchmark-only -q -k "not graph" \
  --benchmark-json "$OUT/layer-gpu.json" > "$OUT/layer-gpu.log" 2>&1 || status=1
python bench/report.py "$OUT/layer-gpu.json" || true
timeout 50 python -m pytest bench/test_layer_gpu.py --benchmark-only -q -k "graph" \
  --benchmark-json "$OUT/layer-graph-gpu.json" >> "$OUT/layer-gpu.log" 2>&1 || status=1
# DCN-ODE (ours, auto and triton) and the published stack, each gradient mode.
timeout 100 python -m pytest bench/test_model_step.py --benchmark-only -q -p no:cacheprovider --rootdir bench \
  -k "dcn-ode" --benchmark-json "$OUT/models-gpu.json" > "$OUT/models-gpu.log" 2>&1 || status=1
python bench/report_models.py "$OUT/models-gpu.json" || true
grep -hE "^FAILED|Error:" "$OUT"/*.log | head -20
exit $status
