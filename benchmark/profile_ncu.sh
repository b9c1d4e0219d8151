#!/usr/bin/env bash
# Nsight Compute of the heaviest kernels of one DiT step (attention, GEMMs), on a lent GPU or yours.
#   benchmark/profile_ncu.sh [OUT_DIR] [extra ncu_step.py args, e.g. --case 1920x1088x121 --fp8]
# Clocks are left alone (--clock-control none), as the lent machines ask. Writes OUT_DIR/ncu_step.ncu-rep
# and a text summary per kernel (SOL, occupancy, achieved rates) in OUT_DIR/ncu_step.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-profiles/ncu}; shift || true
mkdir -p "$out"
# The heavy kernels of the first block: cuDNN SDPA and cuBLAS's persistent (coop) GEMMs (check
# the fp8 GEMMs' names before relying on it with --fp8). --launch-skip 1 passes over the patchify
# projection, the one coop GEMM before the blocks; the timestep / AdaLN / caption GEMMs before
# them are small tiles and do not match.
# (A first version matched every nvjet kernel and caught only that prelude: see profiles/ncu_*.)
ncu --profile-from-start off --clock-control none --target-processes all \
    -k 'regex:sdpa|coop|fmha|flash' --launch-skip 1 --launch-count 10 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section LaunchStats --section Occupancy \
    -o "$out/ncu_step" -f python3 benchmark/ncu_step.py "$@"
ncu --import "$out/ncu_step.ncu-rep" --page details > "$out/ncu_step.txt"
ncu --import "$out/ncu_step.ncu-rep" --page raw --csv \
    --metrics gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \
    > "$out/ncu_step_metrics.csv" || true
echo "ncu report in $out"
