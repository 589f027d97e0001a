"""specq: fast lossless LLM decoding at batch size 1 for quantized models."""
from .errors import SpecqError

__version__ = "0.1.0"
__all__ = ["LLM", "SpecqError", "load_model"]


def __getattr__(name):  # lazy: `import specq` stays cheap
    if name == "LLM":
        from .api import LLM
        return LLM
    if name == "load_model":
        from .models import load_model
        return load_model
    raise AttributeError(name)
