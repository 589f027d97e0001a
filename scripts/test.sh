#!/usr/bin/env bash
# Set up with test dependencies, then run the whole test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
exec python3 -m pytest -q "$@"
