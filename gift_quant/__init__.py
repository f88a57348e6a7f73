"""gift-quant: low-bit LLMs with full-precision salient columns, recovered by GIFT-SW."""
__version__ = "0.1.0"
