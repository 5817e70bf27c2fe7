#!/usr/bin/env bash
# The 7B measurement on a freshly lent GPU machine (no network, minutes of device time). Parts, in the order given
# (default: all, in this order), each in a process of its own (the host cannot hold two 7B optimizer states):
#   tests   the GPU tests of backward_step (bit-exact with backward(); step(), accumulation included), of close()
#           on a model larger than the device limit, and of
#           reads outside a use and engine.gathered() on CUDA;
#   ours24  offload at a 24 GiB budget: 16x2048 tokens x 2 micro-batches per step, 1 + 10 timed steps
#           (on a device out-of-memory error: again with 8 sequences x 4 micro-batches);
#   torch   plain torch with the whole state on the card (fp32 weights, bf16 autocast, fused AdamW) on the same
#           job for 5 steps: the reference trajectory the report compares offload's losses with;
#   half    DeepSpeed ZeRO-3 (params + optimizer in pinned RAM), then offload, on the same job with half the
#           layers (16: 3.4B parameters): the pair the report's vs_deepspeed comes from. DeepSpeed cannot hold
#           the 7B's state in a 128 GiB host (fp32 weights, Adam moments and fp32 gradients, 108 GB, plus the
#           pinned bf16 weights): its 7B run was killed by SIGKILL in its first step, most likely by the
#           out-of-memory killer (bench/results/gpu-scale-h200-2026-12-04-first);
#   ours12  offload at a 12 GiB budget: 8x2048 tokens x 4 micro-batches, 1 + 2 timed steps;
#   ds      DeepSpeed ZeRO-3 on the 7B (only when named);
#   lora    offload, LoRA r=16 on every linear layer of the 7B, its bf16 base (13.5 GB) streamed from pinned RAM
#           under a 3 GiB device limit (4.5x smaller), 16x2048 tokens x 2 micro-batches, 1 + 5 timed steps (only
#           when named; needs peft and accelerate in .whl/: pip download --no-deps ... peft accelerate);
# then the report (bench/gpu_scale.py report) over whatever records exist in OUT. DEADLINE_S (default 580)
# bounds the command. Measured on an H200 (2026-12-04): initialising the 7B state takes ~2 min per offload run,
# DeepSpeed is ready ~1 min after it starts. So within a 15-minute device lease: `tests ours24 torch` in one
# call, then `half ours12` in a second one issued at once (the machine stays warm 30 s), both with the same
# OUT. Before the parts: the wheels carried in .whl/ (DeepSpeed and its pure-Python needs, tomli_w;
# tools/gpu_session.sh says how they are made) go to /tmp/site, and offload's native module is built without
# network.
#   OUT=/some/dir bash bench/gpu_scale.sh [tests] [ours24] [torch] [half] [ours12] [ds]
# A dry run on a machine without a GPU: EXTRA_ARGS is added to every run, e.g.
#   EXTRA_ARGS="--device cpu --hidden 256 --layers 2 --intermediate 688 --heads 4 --seq 128" \
#   DS_PYTHON=/path/to/venv-with-deepspeed/bin/python OUT=/tmp/dry bash bench/gpu_scale.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d /tmp/gpu-scale-out.XXXXXX)}"  # reports go outside the source tree unless OUT says
parts="${*:-tests ours24 torch half ours12}"
deadline=$((SECONDS + ${DEADLINE_S:-580}))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g; df -h /tmp .; } \
    > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
python3 -c "import offload._C" 2>/dev/null || python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 \
    | tail -3
# A linear warm-up to a modest peak: at lr 1e-4 without one, the randomly initialised 7B's loss jumped from 11
# to 18-21 after its first Adam steps (bench/results/gpu-scale-h200-2026-12-04).
lr_args="${LR_ARGS:---lr 3e-5 --lr-warmup 5}"
left() { echo $((deadline - SECONDS)); }
ours() {  # budget micro accum steps device-limit timeout [more arguments]
    timeout -s INT "$6" python3 bench/gpu_scale.py run --budget "$1" --micro-batch "$2" --accum "$3" \
        --steps "$4" --device-limit "$5" --nvme-dir /tmp/offload-swap --out "$out" $lr_args ${7:-} ${EXTRA_ARGS:-} \
        2>&1 | grep -v -E "Warning|warnings.warn" | tee -a "$out/log.txt"
    return "${PIPESTATUS[0]}"
}
deepspeed_run() {  # timeout time-limit steps [more arguments]
    timeout -s KILL "$1" "${DS_PYTHON:-python3}" bench/gpu_scale_ds.py --budget 24GiB --micro-batch 16 --accum 2 \
        --steps "$3" --device-limit 3GiB --time-limit "$2" --out "$out" $lr_args ${4:-} ${EXTRA_ARGS:-} 2>&1 \
        | grep -v -E "Warning|warnings.warn|return func" | tee -a "$out/log.txt"
    # a run killed by the kernel's out-of-memory killer says so only here
    dmesg 2>/dev/null | grep -i -E "out of memory|killed process" | tail -3 | tee -a "$out/log.txt"
}
for part in $parts; do
    echo "== $part ($(left) s left)" | tee -a "$out/log.txt"
    case $part in
    ours24)
        ours 24GiB 16 2 10 3GiB 330
        [ $? -eq 3 ] && ours 24GiB 8 4 10 3GiB "$(( $(left) > 60 ? $(left) - 30 : 30 ))" ;;
    ours12)
        [ "$(left)" -gt 120 ] && ours 12GiB 8 4 2 2GiB "$(( $(left) - 10 ))" ;;
    ds)
        t=$(left)
        [ "$t" -gt 150 ] && deepspeed_run "$((t - 5))" "$((t - 150))" 10 ;;
    half)
        half_args="--layers 16 --label 24GiB-16layers"
        t=$(left)
        [ "$t" -gt 200 ] && deepspeed_run "$(( t / 2 ))" 45 5 "$half_args"
        [ "$(left)" -gt 90 ] && ours 24GiB 16 2 5 3GiB "$(( $(left) - 10 ))" "$half_args" ;;
    torch)
        [ "$(left)" -gt 120 ] && timeout -s INT "$(( $(left) - 10 ))" python3 bench/gpu_scale_torch.py \
            --micro-batch 16 --accum 2 --steps 4 --out "$out" $lr_args ${EXTRA_ARGS:-} 2>&1 \
            | grep -v -E "Warning|warnings.warn" | tee -a "$out/log.txt" ;;
    lora)
        [ "$(left)" -gt 150 ] && ours 24GiB 16 2 5 3GiB "$(( $(left) - 10 ))" "--lora-r 16" ;;
    tests)
        timeout 150 python3 -m pytest -q -m gpu tests/test_engine_cuda.py -k "backward_step or reads_outside or close_brings" -p no:cacheprovider \
            2>&1 | tail -5 | tee -a "$out/log.txt" ;;
    *) echo "gpu_scale.sh: unknown part $part (tests, ours24, torch, half, ours12, ds, lora)"; exit 2 ;;
    esac
done
python3 bench/gpu_scale.py report $(ls "$out"/run-*.json "$out"/ds-*.json "$out"/torch-*.json 2>/dev/null) --out "$out" \
    --command "OUT=$out bash bench/gpu_scale.sh $parts"
