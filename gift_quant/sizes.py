"""What an export costs: the bits per weight of the quantized linears by METHOD section 7's formula, and
measured from an exported folder's files (safetensors headers only).
"""
from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import HEADER_DTYPES
from .grid import QuantizedWeight


def bits_per_weight(results: dict[str, QuantizedWeight]) -> float:
    """Storage of the quantized linears per weight (METHOD section 7): ``b``-bit codes of the
    non-salient columns, an fp16 scale and a ``b``-bit zero per row-group, fp16 salient columns
    and a 32-bit index per salient column."""
    bits = weights = 0
    for qw in results.values():
        out, n_in = qw.codes.shape
        k = qw.salient_idx.numel()
        n_groups = qw.scale.shape[1]
        bits += qw.bits * out * (n_in - k) + (16 + qw.bits) * out * n_groups + 16 * out * k + 32 * k
        weights += out * n_in
    return bits / weights


def storage(folder: Path, layers: dict[str, tuple[int, int]]) -> dict:
    """Size on disk of an exported folder (every safetensors file, adapter included) and the bits per
    weight its tensors spend on the quantized linears ``layers`` (name -> (out, in)): packed codes,
    scales, zeros, ``g_idx``, salient columns and indices, LoRA factors, or plain dense weights.
    Read from the safetensors headers only."""
    from safetensors import safe_open

    linear_bits = total_bytes = 0
    for f in Path(folder).rglob("*.safetensors"):
        total_bytes += f.stat().st_size
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                module = key.removeprefix("base_model.model.")
                while module and module not in layers:
                    module = module.rpartition(".")[0]
                if module:
                    sl = st.get_slice(key)
                    linear_bits += HEADER_DTYPES[sl.get_dtype()].itemsize * 8 * math.prod(sl.get_shape())
    weights = sum(o * i for o, i in layers.values())
    return {"bytes": total_bytes, "linear_bits_per_weight": linear_bits / weights}
