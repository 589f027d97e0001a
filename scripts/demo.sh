#!/usr/bin/env bash
# Set up, then stream a chat answer from the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec specq generate "${@:-What are three tips for writing clear code?}" --max-new-tokens 200
