"""Where things live: evaluation data (../shared/data beside the checkout) and the default model."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import SpecqError

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The shared data folder: $SPECQ_DATA, else ../shared/data next to the repository checkout."""
    d = Path(os.environ.get("SPECQ_DATA") or REPO.parent / "shared" / "data")
    if not d.is_dir():
        raise SpecqError(f"data folder not found: {d} (set SPECQ_DATA)")
    return d


def data_file(name: str) -> Path:
    p = data_dir() / name
    if not p.is_file():
        raise SpecqError(f"data file not found: {p}")
    return p
