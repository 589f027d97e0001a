"""Quantization: formats as nn.Linear swaps (WQLinear, W8A8Linear, W4A8Linear), int8 KV cache,
calibration (RTN, GPTQ, AWQ, SmoothQuant), checkpoints and HF GPTQ/AWQ import, perplexity."""
from .kv import Int8KVCache
from .quantize import FORMATS, quantize_model, weight_bytes
from .w8a8 import W4A8Linear, W8A8Linear
from .wq import WQLinear, register_kernel

__all__ = ["FORMATS", "Int8KVCache", "W4A8Linear", "W8A8Linear", "WQLinear", "quantize_model",
           "register_kernel", "weight_bytes"]
