#!/usr/bin/env bash
# What a lent GPU machine (no network, minutes of time) should run, in one go. Steps, all by default:
#   peers    the paired comparison on the GPU: plain torch, torchao's CPUOffloadOptimizer, DeepSpeed ZeRO-Offload
#            and ZeRO-3 with params in RAM, against offload's optimizer-on-CPU and params-on-CPU (gpu-peers.json);
#   nightly  the nightly suite (GPU tests + its fixed benchmarks against bench/baselines/nightly-gpu.json);
#   timeline a profiled step of offload's optimizer-on-CPU placement on the comparison's model;
# and, only when named, `baseline`: the nightly with --update-baseline first (a metric was added or redefined),
# then `nightly` checks against what it stored. Before the steps: the wheels carried in .whl/ (torchao, tomli_w,
# DeepSpeed and its pure-Python needs) go to /tmp/site, and offload is built and installed without network.
# Making .whl/ on a machine with network (Python 3.12 on the GPU machine; DeepSpeed only as an sdist, so its
# pure-Python wheel is built here, its ops are JIT-built there on first use):
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl   (needs torch installed)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl torchao==0.18.0 tomli_w==1.2.0 \
#       hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions   (matching versions)
# Results: one archive, $OUT/gpu-session.tgz (OUT: a new temporary directory unless set), plus the logs' tails on
# stdout. The scripts it runs are in bench/ of the source tree. Usage (repository root):
#   OUT=/some/dir bash tools/gpu_session.sh [peers] [baseline] [nightly] [timeline]
set -uo pipefail
out="${OUT:-$(mktemp -d /tmp/gpu-session-out.XXXXXX)}"
steps="${*:-peers nightly timeline}"
work="$(mktemp -d /tmp/gpu-session.XXXXXX)"
export PYTHONUNBUFFERED=1
status=0
has() { [[ " $steps " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/device.txt"
python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -5 || exit 1
if has peers; then
    timeout 230 python3 bench/gpu_peers.py --modes torch,torchao,opt-cpu,params-cpu,ds-offload,ds-infinity \
        --json "$work/gpu-peers.json" 2>&1 | tee "$work/peers.log" | grep -v -E "^\[|Warning|warn\(" || status=1
fi
if has baseline; then
    timeout 200 python3 bench/nightly_gpu.py --no-install --update-baseline --report-dir "$work/baseline" \
        --work-dir "$work/baseline" 2>&1 | tee "$work/baseline.log" | tail -3
    cp bench/baselines/nightly-gpu.json "$work/"
fi
if has nightly; then
    skip=(); has baseline && skip=(--skip-tests)  # the baseline run just ran them
    timeout 200 python3 bench/nightly_gpu.py --no-install "${skip[@]}" --report-dir "$work" --work-dir "$work" \
        2>&1 | tee "$work/nightly.log" | tail -30 || status=1
fi
if has timeline; then
    timeout 60 python3 bench/step_timeline.py --device cuda --params device --optimizer cpu --hidden 1024 \
        --layers 24 --batch 8 --seq 512 --steps 2 --backward-step --out "$work/timeline-opt-cpu.json" 2>&1 | tail -4
fi
mkdir -p "$out" && tar czf "$out/gpu-session.tgz" -C "$work" . && ls -la "$out"
exit $status
