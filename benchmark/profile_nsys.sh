#!/usr/bin/env bash
# Nsight Systems recipe for your own machine (on the lent GPUs nsys records but cannot build its
# report; profiles/ there come from torch.profiler). NVTX ranges (request, stage, step, block,
# attention, FFN, collectives) are emitted only when LTX2_TP_NVTX=1.
#   benchmark/profile_nsys.sh single  [extra bench_dit.py args]
#   benchmark/profile_nsys.sh multi N [extra bench_parallel.py args]   # one report per rank
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-single}; shift || true
export LTX2_TP_NVTX=1
out=profiles/nsys; mkdir -p "$out"
trace="--trace=cuda,nvtx,osrt --cuda-memory-usage=false --sample=none"
if [ "$mode" = single ]; then
  nsys profile $trace -o "$out/dit_single" --force-overwrite true \
    python benchmark/bench_dit.py --cases 1920x1088x121 --repeat 1 "$@"
  nsys stats --report cuda_gpu_kern_sum,nvtx_sum --format csv -o "$out/dit_single" "$out/dit_single.nsys-rep"
else
  n=${1:-2}; shift || true
  # nsys runs inside each torchrun worker, so %q{RANK} names one report per rank; NCCL kernels
  # appear in the cuda trace, our collectives as NVTX ranges
  torchrun --nproc-per-node "$n" --no-python nsys profile $trace -o "$out/parallel_rank%q{RANK}" \
    --force-overwrite true python benchmark/bench_parallel.py --cases 1920x1088x121 --repeat 1 "$@"
  for f in "$out"/parallel_rank*.nsys-rep; do
    nsys stats --report cuda_gpu_kern_sum,nvtx_sum --format csv -o "${f%.nsys-rep}" "$f"
  done
fi
echo "reports in $out (open the .nsys-rep files in Nsight Systems)"
