# Nsight Compute stall breakdown of the wide W4A16 kernel (bench/dev/ncu_wide.py), M=64, Llama-3-8B gate_up and o.
set -e
export PYTHONPATH=$PWD
for s in "gate_up 64 WARPS=4" "o 64 WARPS=4"; do
  echo "=== $s"
  ncu -k regex:w4wide --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section ComputeWorkloadAnalysis \
      --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \
      python3 bench/dev/ncu_wide.py $s 2>&1 | grep -v "^==PROF==" | grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Grid Size|Waves Per SM|Compute \(SM\)|Issue Slots|Eligible|Active Warps|stalled|inst_executed|hmma|Pipe" | awk '$NF+0 > 0.05 || !/stalled/' | head -60
done
