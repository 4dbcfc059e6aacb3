#!/usr/bin/env bash
# Builds mamba_ssm's CUDA selective scan (the `selective_scan_cuda` extension) for the H100 (sm_90),
# so that `scripts/bench_scan.py --compare` can time it beside our kernels (issue 4).
#
#   bash scripts/build_mamba_ssm_peer.sh SDIST OUT_DIR
#   PYTHONPATH=OUT_DIR:$PYTHONPATH python scripts/bench_scan.py --workload selective_scan --compare
#
# SDIST is mamba_ssm's source distribution from PyPI (e.g. mamba_ssm-2.3.2.post1.tar.gz). It is
# another project's code: it is extracted into a temporary folder and built there, never copied into
# this repository; OUT_DIR receives the built selective_scan_cuda.so (and ninja's objects).
#
# Only the selective scan is built, with torch.utils.cpp_extension.load (ninja, MAX_JOBS parallel
# jobs, default 16): selective_scan.cpp and its nine .cu files, since the .cpp dispatches to every
# instantiation (fp32/fp16/bf16 inputs, real/complex weights). The nvcc flags are those of
# mamba_ssm's setup.py, for one target, sm_90, instead of its eight. With CUDA 13.0 (CCCL 3) and
# torch 2.11 the sources build unchanged. Needs nvcc and a CUDA build of torch (python3 by default;
# set PYTHON to use another interpreter). Prints its progress and the build time.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: bash scripts/build_mamba_ssm_peer.sh SDIST OUT_DIR" >&2
  exit 2
fi
sdist=$(realpath "$1")
out_dir=$(realpath -m "$2")
mkdir -p "$out_dir"
source_dir=$(mktemp -d /tmp/mamba_ssm_peer_src.XXXXXX)
trap 'rm -rf "$source_dir"' EXIT

echo "extracting $sdist"
tar -xzf "$sdist" -C "$source_dir" --strip-components=1
echo "nvcc: $(nvcc --version | tail -n 1)"

MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 "${PYTHON:-python3}" - "$source_dir" "$out_dir" <<'EOF'
import os
import sys
import time

import torch
from torch.utils import cpp_extension

source_dir, out_dir = sys.argv[1:]
csrc = os.path.join(source_dir, "csrc", "selective_scan")
sources = [os.path.join(csrc, "selective_scan.cpp")] + sorted(
    os.path.join(csrc, name) for name in os.listdir(csrc) if name.endswith(".cu"))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): building {len(sources)} sources "
      f"with MAX_JOBS={os.environ['MAX_JOBS']} into {out_dir}", flush=True)
start = time.perf_counter()
module = cpp_extension.load(
    name="selective_scan_cuda", sources=sources, build_directory=out_dir, verbose=False,
    extra_include_paths=[csrc], extra_cflags=["-O3", "-std=c++17"],
    # setup.py's nvcc flags, less --threads 4 (ninja already runs one nvcc per core) and
    # --ptxas-options=-v (a register report for every template instance).
    extra_cuda_cflags=[
        "-O3", "-std=c++17",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
        "-gencode", "arch=compute_90,code=sm_90"])
print(f"built {module.__file__} in {time.perf_counter() - start:.0f} s", flush=True)
EOF
