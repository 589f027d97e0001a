#!/usr/bin/env bash
# Bring SmolLM2-135M-Instruct (98 MB GGUF) and the evaluation data to the GPU machine in two back-to-back runs
# (a run carries at most 64 MiB). On this machine first:
#   ../shared/tools/split-for-device $(python -c "from specq.models.gguf import default_model_path as d; print(d())")
#   python -m specq.data export .gpu-data;  pip download --no-deps gguf==0.19.0 -d .whl
# device run 1 (carry .device-carry/part-aa .gpu-data .whl):  bash bench/device_model.sh part1
# device run 2 (carry .device-carry/part-ab .device-carry/part-ac): bash bench/device_model.sh part2 && <work>
# Work afterwards with: MODEL=/root/models/SmolLM2-135M-Instruct.Q4_1.gguf SPECQ_DATA=/root/data PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
M=/root/models
mkdir -p $M
case "$1" in
  part1)
    cp .device-carry/part-aa/part.aa $M/
    rm -rf /root/data && cp -r .gpu-data /root/data
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    ls -la $M /root/data | head ;;
  part2)
    cat $M/part.aa .device-carry/part-ab/part.ab .device-carry/part-ac/part.ac > $M/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "a1231443440b107ff29f02bdb38c9d0a  $M/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c - ;;
  *) echo "usage: device_model.sh part1|part2" >&2; exit 2 ;;
esac
