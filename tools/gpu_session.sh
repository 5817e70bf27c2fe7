#!/usr/bin/env bash
# Everything a lent GPU machine (no network, minutes of time) should run, in one go, results under $OUT:
#   1. the wheels carried in .whl/ (torchao, tomli_w, DeepSpeed and its pure-Python needs) into /tmp/site;
#   2. offload built and installed without network;
#   3. the paired comparison on the GPU: plain torch, torchao's CPUOffloadOptimizer, DeepSpeed ZeRO-Offload and
#      ZeRO-Infinity (params in RAM) against offload's optimizer-on-CPU and params-on-CPU (gpu-peers.json);
#   4. the nightly suite (GPU tests + its fixed benchmarks against tools/baselines, report in $OUT);
#   5. a profiled timeline of offload's optimizer-on-CPU step on the comparison's model (timeline-*.json).
# Each step has its own time limit so that one hang leaves the rest their time. Usage (repository root):
#   OUT=/some/dir bash tools/gpu_session.sh
set -uo pipefail
out="${OUT:-gpu-session}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -5 || exit 1
timeout 230 python3 -m offload.bench.gpu --modes torch,torchao,opt-cpu,params-cpu,ds-offload,ds-infinity \
    --json "$out/gpu-peers.json" 2>&1 | tee "$out/peers.log" | grep -v -E "^\[|Warning|warn\(" || status=1
timeout 200 python3 tools/nightly_gpu.py --no-install --report-dir "$out" --work-dir "$out" 2>&1 \
    | tee "$out/nightly.log" | tail -40 || status=1
timeout 50 python3 tools/step_timeline.py --device cuda --params device --optimizer cpu --hidden 1024 \
    --layers 24 --batch 8 --seq 512 --steps 3 --backward-step --out "$out/timeline-opt-cpu.json" 2>&1 | tail -5
exit $status
