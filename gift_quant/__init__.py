"""gift-quant: low-bit LLMs with full-precision salient columns, recovered by GIFT-SW."""
import logging

__version__ = "0.1.0"

# Import-time notices of other libraries that a gift-quant user cannot act on: torchao reporting CUDA
# kernels missing from a CPU build, torch's deprecation notice about torchao's enum registration.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .gift_format import load  # noqa: E402,F401  the native checkpoint loader: gift_quant.load(path)
from . import hf_quantizer  # noqa: E402,F401  registers quant_method "gift" with transformers
