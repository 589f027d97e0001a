# Nsight Compute view of the W4A16 kernel on the GPU machine (speed-of-light, occupancy, launch stats) for
# gate_up / qkv / down of a Llama-3-8B layer at M=1 (bench/dev/ncu_one.py); findings in kernels_w4a16_dev.txt run 9.
set -e
export PYTHONPATH=$PWD
for s in "gate_up 1" "qkv 1" "down 1"; do
  echo "=== $s"
  ncu -k regex:w4a16 --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis python3 bench/dev/ncu_one.py $s 2>&1 | grep -v "^==PROF==" | grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Grid Size|Waves Per SM|Shared Memory Config|L2 Hit|Mem Busy|Max Bandwidth|Dynamic Shared|Static Shared|Compute \(SM\)|Issue|Eligible|Active Warps" | head -40
done
