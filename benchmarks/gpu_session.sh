#!/usr/bin/env bash
# Few device calls per machine kind, so a session spends its device time on measuring, not on starts
# (each call must fit the 600 s limit). Carry .devbundle with every call.
#   one H100:   bash benchmarks/gpu_session.sh x1a <commit>, then at once (warm machine) x1c, then x1b
#               (kernels.py also sweeps the repacked path on sm_90: KERNELS_ARGS="--ms 1,2,4,8,16" etc. to split it)
#   one H100, decode only (M = 1, 2 re-tuned, then the engine):  x1m <commit>, then at once x1n <commit>
#   one H100, the repacked Gluon kernel (tests + probe):  x1g <commit>
#   one H100, the product path on repacked weights (kernel + engine GPU tests):  x1r <commit>
#   one H100, the same with the pipelined prefill kernel, then the engine benchmark:  x1e <commit>
#   one H100, prefill kernels on repacked weights (tests, ncu, probe from 256 rows):  x1p <commit>
#   4 H100s:    bash benchmarks/gpu_session.sh x4 <commit>   (x4s: GPU quant-job tests + [SCALING_GPUS, default 1,4,2]-GPU scaling only)
#   what is left of a budget, 2-4 GPUs:  [SCALING_GPUS=1,2] bash benchmarks/gpu_session.sh x4f <commit>
#   2 GPUs, tensor parallel (the bundle and the tree exceed one call's carry, so Ray goes ahead through /tmp):
#               call 1, carry [".devbundle/ray.tar.xz"]: mkdir -p /tmp/devb && cp .devbundle/ray.tar.xz /tmp/devb/
#               call 2 at once, carry [".devbundle/whl", ".devbundle/setup.sh"]: bash benchmarks/gpu_session.sh x2 <commit>
#               (tp.py's three configurations: 1 GPU, 2 with NCCL, 2 with symmetric memory; the GPU TP tests; then
#               pipeline(tp=2) streamed against whole, benchmarks/remote_stream.py)
#               x2p instead of x2: torch.profiler traces of both ranks and of one GPU (benchmarks/tp_profile.py)
#   4 GPUs, tensor parallel: the same two calls on nvidia-h200-x4 with x4t (tp_reduce_norm.py --world 4, tp.py --tp 4)
# Everything lands under $OUT/<name>/; write the docs sections here afterwards from the JSON files
# (each benchmark's --report, or benchmarks/_report.py:write_section with its *_section.md).
set -uo pipefail
kind=${1:?x1a, x1c, x1b, x1g, x1r, x1e, x1p, x1m, x1n, x2, x2p, x4, x4s, x4t or x4f}
export RAYAWQ_COMMIT=${2:?commit} PYTHONUNBUFFERED=1
out=${OUT:?run this through the device tool}
if [ "$kind" = x2 ] || [ "$kind" = x2p ] || [ "$kind" = x4t ]; then  # Ray's archive staged in /tmp/devb before
  cp -r .devbundle/whl .devbundle/setup.sh /tmp/devb/ && source /tmp/devb/setup.sh || exit 1
else
  source .devbundle/setup.sh || exit 1
fi
nvidia-smi -L
case $kind in
  x1a)
    # kernel tests, then the kernel benchmark's three largest shapes + table; results and table are also left
    # in /tmp for x1c and x1b on the same warm machine
    timeout 120 python3 -m pytest -q tests/gpu/test_kernels_gpu.py 2>&1 | tail -4
    timeout 370 python3 benchmarks/kernels.py --out "$out/kernels" --budget-s 330 \
      --shapes 8192x8192,8192x28672,4096x28672 ${KERNELS_ARGS:-} 2>&1 | tail -40
    cp "$out/kernels/tuned_h100.json" /tmp/rayawq_tuned_h100.json && echo "table left in /tmp"
    cp "$out/kernels/kernels_results.json" /tmp/rayawq_kernels_results.json
    ;;
  x1c)
    # the other four shapes; rows and table of x1a (same warm machine) join this run's section, plot and table
    [ -f /tmp/rayawq_tuned_h100.json ] && export RAYAWQ_KERNEL_TABLE=/tmp/rayawq_tuned_h100.json
    timeout 420 python3 benchmarks/kernels.py --out "$out/kernels" --budget-s 380 \
      --shapes 4096x4096,4096x6144,4096x14336,14336x4096 --also /tmp/rayawq_kernels_results.json ${KERNELS_ARGS:-} \
      2>&1 | tail -30
    cp "$out/kernels/tuned_h100.json" /tmp/rayawq_tuned_h100.json && echo "table left in /tmp"
    ;;
  x1g)
    # the fragment-repacked Gluon kernel: GPU correctness, then M = 1, 16 side by side with the table's kernel,
    # PyTorch's int4 kernel and cuBLAS on the four large shapes, and the read floor at M = 1 (no Ray needed)
    timeout 150 python3 -m pytest -q tests/gpu/test_kernels_gpu.py -k "${GLUON_TESTS:-gluon or repacked}" 2>&1 | tail -4
    timeout 400 python3 benchmarks/gluon_probe.py --out "$out/gluon" --ms ${GLUON_MS:-1,16,64} ${GLUON_ARGS:-} 2>&1 \
      | grep -E "^K=|Error" | tail -20
    ;;
  x1r)
    # the engine on repacked weights (kernels/repacked_dispatch.py): the product path's GPU tests, then the engine's
    timeout 120 python3 -m pytest -q tests/gpu/test_kernels_gpu.py -k "repacked_weights_every_m or wgmma" 2>&1 \
      | grep -E "Error|assert|passed|failed|FAILED" | tail -12
    timeout 200 python3 -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | grep -E "Error|assert|passed|failed|FAILED|repacked" | tail -20
    ;;
  x1e)
    # the product path on repacked weights with the pipelined prefill kernel: kernel + engine GPU tests, then the
    # engine benchmark (the transformers row from an earlier run: ENGINE_ARGS="--hf-from <json>")
    timeout 150 python3 -m pytest -q tests/gpu/test_kernels_gpu.py -k "repacked_weights_every_m or pipelined" 2>&1 \
      | grep -E "Error|assert|passed|failed|FAILED" | tail -8
    timeout 200 python3 -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | grep -E "Error|assert|passed|failed|FAILED" | tail -8
    timeout 330 python3 benchmarks/engine.py --out "$out/engine" ${ENGINE_ARGS:-} 2>&1 | tail -12
    ;;
  x1p)
    # prefill work on repacked weights: Gluon kernel tests, Nsight Compute on the pipelined kernel's launches named
    # in NCU_CASES ("KxN:M:cfg-json;..."), then the probe at PROBE_MS (default 256,1024,4096) on PIPE_TILES
    timeout 200 python3 -m pytest -q tests/gpu/test_kernels_gpu.py -k "${GLUON_TESTS:-gluon or repacked}" 2>&1 \
      | grep -E "Error|assert|passed|failed|FAILED" | tail -8
    IFS=';' read -ra cases <<< "${NCU_CASES:-}"
    for i in "${!cases[@]}"; do
      IFS=':' read -r shape m cfg <<< "${cases[$i]}"
      timeout 150 ncu --clock-control none -k regex:_awq_gluon --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section MemoryWorkloadAnalysis --section LaunchStats \
        python3 benchmarks/one_launch.py --shape "$shape" --m "$m" --cfg "$cfg" > "$out/ncu_$i.txt" 2>&1
      echo "ncu $shape M=$m $cfg"
      grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Stall|Issued Warp|No Eligible|Warp Cycles Per Issued|L2 Hit|Block Limit" "$out/ncu_$i.txt" | head -24
    done
    timeout ${PROBE_S:-330} python3 benchmarks/gluon_probe.py --out "$out/gluon" --ms ${PROBE_MS:-256,1024,4096} \
      --skip-dot --skip-wgmma --skip-mma ${PIPE_TILES:+--pipe-tiles $PIPE_TILES} ${GLUON_ARGS:-} 2>&1 \
      | grep -E "^K=|Error" | tail -20
    ;;
  x1m)
    # decode buckets only (M = 1, 2) on all seven shapes, joined into the repo table (left in /tmp for x1n)
    timeout 60 python3 -m pytest -q tests/gpu/test_kernels_gpu.py -k "variant" 2>&1 | tail -3
    timeout 400 python3 benchmarks/kernels.py --out "$out/kernels" --budget-s 370 --ms 1,2 2>&1 | grep -E "^K=|total"
    python3 benchmarks/merge_table.py kernels/tuned_h100.json "$out/kernels/tuned_h100.json" --ms 1,2 \
      --out /tmp/rayawq_tuned_h100.json && cp /tmp/rayawq_tuned_h100.json "$out/kernels/tuned_h100_merged.json"
    ;;
  x1n)
    # right after x1m on the same warm machine: engine GPU tests and the engine benchmark with x1m's table
    [ -f /tmp/rayawq_tuned_h100.json ] && export RAYAWQ_KERNEL_TABLE=/tmp/rayawq_tuned_h100.json
    echo "kernel table: ${RAYAWQ_KERNEL_TABLE:-repo}"
    timeout 220 python3 -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | grep -E "Error|assert|passed|failed|FAILED" | tail -25
    timeout 90 python3 -m pytest -q tests/gpu/test_kernels_gpu.py -k "silu or graph or partials" 2>&1 | grep -E "Error|assert|passed|failed|FAILED" | tail -25
    timeout 420 python3 benchmarks/engine.py --out "$out/engine" ${ENGINE_ARGS:-} 2>&1 | tail -12
    ;;
  x1b)
    # second half: engine GPU tests, engine and serve benchmarks with x1a's table when this machine has it
    [ -f /tmp/rayawq_tuned_h100.json ] && export RAYAWQ_KERNEL_TABLE=/tmp/rayawq_tuned_h100.json
    echo "kernel table: ${RAYAWQ_KERNEL_TABLE:-repo}"
    timeout 100 python3 -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | tail -4
    timeout 170 python3 benchmarks/engine.py --out "$out/engine" --skip-hf 2>&1 | tail -15
    timeout 280 python3 benchmarks/serve.py --out "$out/serve" --no-docs --requests-per-client 2 2>&1 | tail -20
    ;;
  x2)
    # tensor parallel on 2 GPUs: the fused row-layer finish against its launches (benchmarks/tp_reduce_norm.py),
    # the engine benchmark (8B shape; each configuration keeps its row if cut), then the GPU tests (NCCL and symmetric memory agree with one GPU, a Serve replica at tp 2, pipeline(tp=2))
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    timeout 120 python3 benchmarks/tp_reduce_norm.py --out "$out/rn" 2>&1 | grep -E "^\| [12] |Error" | tail -14
    timeout 360 python3 benchmarks/tp.py --out "$out/tp" --tp 2 2>&1 | grep -v "^(" | tail -6
    timeout 200 python3 -m pytest -q tests/gpu/test_tp_gpu.py 2>&1 | tail -4
    timeout 150 python3 benchmarks/remote_stream.py --out "$out/rs" --tp 2 2>&1 | grep "^{" | tail -1
    ;;
  x4t)
    # tensor parallel on 4 GPUs (staged as x2): the fused row-layer finish at --world 4, then the engine benchmark
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    timeout 120 python3 benchmarks/tp_reduce_norm.py --world 4 --out "$out/rn4" 2>&1 | grep -E "^\| [14] |Error" | tail -14
    timeout 420 python3 benchmarks/tp.py --out "$out/tp4" --tp 4 2>&1 | grep "^{" | tail -3
    ;;
  x2p)
    # where a tensor-parallel step's time goes: torch.profiler traces of both ranks and of 1 GPU, then their summary
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    timeout 420 python3 benchmarks/tp_profile.py --out "$out/prof" --tp 2 2>&1 | grep -v "^(" | tail -80
    ;;
  x4f)
    # one x4 call for what is left of a session's budget: a decode-kernel probe (one shape), the scaling job
    # on 1 and 4 GPUs, then the serve overhead at concurrency 64 (each part keeps what it measured if cut)
    timeout 70 python3 benchmarks/kernels.py --out "$out/kd" --shapes 8192x8192 --ms 1,2 2>&1 | grep -E "^K=|rows|decode" | tail -4
    timeout 330 python3 benchmarks/quant_scaling.py --gpus "${SCALING_GPUS:-1,4}" --out "$out/scaling" 2>&1 \
      | grep -v " done in " | tail -12
    timeout 150 python3 benchmarks/serve.py --out "$out/serve" --no-docs --concurrency 64 --requests-per-client 2 \
      2>&1 | tail -8
    ;;
  x4s)
    # the scaling job alone (1, 4, 2 GPUs) after its GPU tests (CUDA IPC inputs vs the object store)
    timeout 90 python3 -m pytest -q tests/gpu/test_quant_job_gpu.py 2>&1 | tail -4
    timeout 400 python3 benchmarks/quant_scaling.py --gpus "${SCALING_GPUS:-1,4,2}" --out "$out/scaling" 2>&1 \
      | grep -E "GPUs|^\||^- |identical|^\{" | tail -24
    ;;
  x4)
    # 7B shape on 1, 4, 2 GPUs; then a 70B-shape job cut to 4 blocks on one GPU: its peak GPU memory per task is
    # the point (bounded by one block, whatever the number of layers); progress lines show each block's GPU
    timeout 420 python3 benchmarks/quant_scaling.py --gpus 1,4,2 --out "$out/scaling" 2>&1 \
      | grep -E " done in |GPUs|^\|" | tail -24
    rm -rf /tmp/rayawq-scaling-model /tmp/rayawq-scaling-out
    timeout 150 python3 benchmarks/quant_scaling.py --shape llama2-70b --layers 4 --gpus 1 --out "$out/scaling70b" \
      --model-dir /tmp/rayawq-70b 2>&1 | grep -E "GPUs|^\|" | tail -6
    ;;
  *) echo "unknown kind $kind"; exit 2 ;;
esac
