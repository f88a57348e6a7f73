"""gift-quant: low-bit LLMs with full-precision salient columns, recovered by GIFT-SW."""
import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

# Import-time notices of other libraries that a gift-quant user cannot act on: torchao reporting CUDA
# kernels missing from a CPU build, torch's deprecation notice about torchao's enum registration.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .gift_format import load  # noqa: E402,F401  the native checkpoint loader: gift_quant.load(path)

# ``import gift_quant`` registers quant_method "gift" with transformers (``hf_quantizer``). Importing
# transformers' quantizer registry costs seconds (it imports every quantizer backend, torchao included),
# which the command line's --help and code that never loads a model through transformers should not pay:
# so the registration runs right after that registry is imported, by whoever imports it first (any
# ``from_pretrained`` does), or now if it already is.
_REGISTRY = "transformers.quantizers.auto"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """A post-import hook: finds ``_REGISTRY`` the normal way and runs ``hf_quantizer`` once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            importlib.import_module(f"{__name__}.hf_quantizer")

        spec.loader.exec_module = exec_module
        return spec


if _REGISTRY in sys.modules:
    from . import hf_quantizer  # noqa: E402,F401
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
