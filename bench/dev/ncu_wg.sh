# Nsight Compute view of the wgmma W4A16 kernel (specq/kernels/w4wg.py) at 64 tokens, Llama-3-8B gate_up / down /
# qkv (bench/dev/ncu_one.py; w4a16_linear sends 17..64 tokens to it): speed of light, occupancy, warp stalls,
# scheduler; findings in kernels_w4a16_dev.txt run 17.
set -e
export PYTHONPATH=$PWD
for s in "gate_up 64" "down 64" "qkv 64"; do
  echo "=== $s"
  ncu -k regex:w4wg --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis python3 bench/dev/ncu_one.py $s 2>&1 \
    | grep -v "^==PROF==" | grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Grid Size|Waves Per SM|Dynamic Shared|Compute \(SM\)|Issue|Eligible|Active Warps|Executed Ipc|SM Busy|No Eligible|One or More" | head -48
done
