"""End-to-end decoding speed at Llama-3-8B / 70B shapes (random weights): plain tok/s per format vs the
weight-bytes roofline, speculative decoding with controlled acceptance, and the planner's choice.

    PYTHONPATH=$PWD python3 bench/e2e.py --out $OUT            (GPU: every phase, ~5 min)
    python bench/e2e.py --tiny --device cpu --out /tmp/e2e     (toy shapes)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specq.bench.e2e import main  # noqa: E402
from specq.errors import SpecqError  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpecqError as e:      # bad arguments: one line, no traceback
        sys.exit(f"bench/e2e.py: error: {e}")
