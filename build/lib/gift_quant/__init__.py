"""gift-quant: low-bit LLMs with full-precision salient columns, recovered by GIFT-SW."""
__version__ = "0.1.0"

from .export import load  # noqa: E402,F401  the native checkpoint loader: gift_quant.load(path)
from . import hf_quantizer  # noqa: E402,F401  registers quant_method "gift" with transformers
