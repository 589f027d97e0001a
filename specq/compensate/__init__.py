"""Dynamic error compensation of low-bit weights (QDEC / DecDEC): see docs/compensation.md."""
from .linear import (CompensatedLinear, collect_activations, compensate_model, compensated_modules,
                     keep_fp_weights, set_k_fraction)
from .residual import Residual
from .select import approx_topk, chunking, exact_topk, k_chunk_for, recall
from .tune import add_compensate_arg, apply_compensation, parse_spec, tune_budget

__all__ = ["CompensatedLinear", "Residual", "compensate_model", "keep_fp_weights", "set_k_fraction",
           "compensated_modules", "collect_activations", "approx_topk", "exact_topk", "chunking",
           "k_chunk_for", "recall", "add_compensate_arg", "apply_compensation", "parse_spec", "tune_budget"]
