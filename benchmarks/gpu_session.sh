#!/usr/bin/env bash
# One device call per machine kind, so a session spends its device time on measuring, not on starts.
#   x1 (nvidia-h100-x1; carry .devbundle):  bash benchmarks/gpu_session.sh x1 <commit>
#   x4 (nvidia-h100-x4; carry .devbundle):  bash benchmarks/gpu_session.sh x4 <commit>
# Everything lands under $OUT/<name>/; write the docs sections here afterwards from the JSON files
# (each benchmark's --report, or benchmarks/_report.py:write_section with its *_section.md).
set -uo pipefail
kind=${1:?x1, kx or x4}
export RAYAWQ_COMMIT=${2:?commit} PYTHONUNBUFFERED=1
out=${OUT:?run this through the device tool}
source .devbundle/setup.sh || exit 1
nvidia-smi -L
case $kind in
  x1)
    # GPU tests first (correctness), then the kernels (the engine's AWQ speed follows them), then engine, serve.
    timeout 150 python3 -m pytest -q tests/gpu 2>&1 | tail -5
    timeout 200 python3 benchmarks/kernels.py --out "$out/kernels" --budget-s 170 2>&1 | tail -25
    timeout 150 python3 benchmarks/engine.py --out "$out/engine" --skip-hf 2>&1 | tail -15
    timeout 200 python3 benchmarks/serve.py --out "$out/serve" --no-docs 2>&1 | tail -15
    ;;
  kx)
    # kernel experiment: correctness of every variant on the GPU, then the decode-sized rows of the target shapes
    timeout 200 python3 -m pytest -q -x tests/gpu/test_kernels_gpu.py 2>&1 | tail -4
    timeout 330 python3 benchmarks/kernels.py --out "$out/kx" --shapes 8192x8192,4096x14336,14336x4096,8192x28672 \
      --ms 1,2,4,16 --budget-s 300 2>&1 | tail -30
    ;;
  x4)
    timeout 540 python3 benchmarks/quant_scaling.py --gpus 1,4,2 --out "$out/scaling" 2>&1 \
      | grep -v " done in " | tail -20
    ;;
  *) echo "unknown kind $kind"; exit 2 ;;
esac
