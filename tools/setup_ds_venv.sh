#!/usr/bin/env bash
# A throwaway DeepSpeed venv for the peer benchmarks (bench/adam_ds.py, io_ds.py, e2e.py --ds-python DIR/bin/python).
# DeepSpeed is never a dependency of offload. Usage: bash tools/setup_ds_venv.sh [DIR]   (default: ./ds-venv)
# Its ops are JIT-built into DIR/../torch_ext on first use (cpu_adam about 1 min, async_io about 3 min on 2
# cores); async_io needs libaio-dev (apt-get install libaio-dev).
set -euo pipefail
dir="${1:-ds-venv}"
python3 -m venv "$dir"
"$dir/bin/pip" install -q torch==2.13.0
DS_BUILD_OPS=0 "$dir/bin/pip" install -q deepspeed==0.19.8 ninja py-cpuinfo psutil numpy transformers==5.24.0
export TORCH_EXTENSIONS_DIR="$(cd "$dir/.." && pwd)/torch_ext"
"$dir/bin/python" -c "from deepspeed.ops.op_builder import CPUAdamBuilder, AsyncIOBuilder; CPUAdamBuilder().load(verbose=False); AsyncIOBuilder().load(verbose=False); print('DeepSpeed ops built in $TORCH_EXTENSIONS_DIR')"
echo "done: $dir/bin/python"
