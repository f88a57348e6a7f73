"""Bit packing in the GPTQ v1 layout (as auto-gptq / gptqmodel write it).

Codes are packed along the first dimension as a little-endian bit stream: 32 consecutive values
take ``bits`` int32 words, value ``r`` of a block starting at bit ``r * bits``. For 2, 4 and 8 bits
that is "value j in bits [bits*j, bits*(j+1)) of its word"; 3-bit values cross word boundaries
exactly as the GPTQ tools pack them. A first dimension that is not a multiple of 32 ends in the word its last
bit falls in, ``ceil(n * bits / 32)`` words, as gptqmodel sizes them (a key / value projection of 48 outputs).

    qweight: (ceil(in * bits / 32), out) int32   codes packed along the input dimension
    qzeros:  (n_groups, ceil(out * bits / 32)) int32   (zero - 1) packed along the output dimension (v1)
    scales:  (n_groups, out) float16
    g_idx:   (in,) int32   group of each input column (not j // group_size after act-order)

v2 (gptqmodel's ``gptq_v2``) is the same layout with the zero point itself in ``qzeros``.
"""
from __future__ import annotations

import torch

from .grid import QuantizedWeight


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) integer codes in ``0..2^bits-1`` -> (ceil(n * bits / 32), m) int32."""
    n, m = codes.shape
    blocks = -(-n // 32)
    c = torch.zeros(blocks * 32, m, dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    c = c.reshape(blocks, 32, m)
    words = torch.zeros(blocks, bits, m, dtype=torch.int64, device=codes.device)
    for r in range(32):
        for b in range(bits):
            p = r * bits + b
            words[:, p // 32] |= ((c[:, r] >> b) & 1) << (p % 32)
    words = words.reshape(blocks * bits, m)[: -(-n * bits // 32)]  # the words past the last code hold nothing
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: the first ``n`` rows of codes, int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    blocks = -(-words.shape[0] // bits)
    words = torch.cat([words, words.new_zeros(blocks * bits - words.shape[0], words.shape[1])])
    words = words.reshape(blocks, bits, -1)
    c = torch.zeros(blocks, 32, words.shape[-1], dtype=torch.int64, device=packed.device)
    for r in range(32):
        for b in range(bits):
            p = r * bits + b
            c[:, r] |= ((words[:, p // 32] >> (p % 32)) & 1) << b
    return c.reshape(blocks * 32, -1)[:n]


FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: v1 stores zero - 1 in qzeros, v2 (gptqmodel's) the zero itself


def static_g_idx(in_features: int, group_size: int, n_groups: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The ``g_idx`` of groups of consecutive columns: ``j // group_size`` (all 0 per row), on ``device``."""
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // g).clamp(max=n_groups - 1)


def to_gptq(qw: QuantizedWeight, fmt: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ tensors (``fmt``: v1 ``gptq`` or v2 ``gptq_v2``) of a layer with every column quantized (salient
    columns: their own rounding)."""
    in_f = qw.codes.shape[1]
    n_groups = qw.scale.shape[1]
    zero = qw.zero.round().to(torch.int64) - int(fmt == "gptq")
    if (zero < 0).any():
        raise ValueError("GPTQ v1 stores zero - 1 and cannot hold a zero point of 0 (an asymmetric grid of an "
                         "all-positive group); use sym: true for this export")
    g_idx = static_g_idx(in_f, qw.group_size, n_groups, qw.codes.device) if qw.g_idx is None else qw.g_idx
    return {
        "qweight": pack_rows(qw.codes.T, qw.bits),
        "qzeros": pack_rows(zero, qw.bits).T.contiguous(),
        "scales": qw.scale.T.contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def from_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, in_features: int, out_features: int,
              fmt: str = "gptq") -> QuantizedWeight:
    """A layer's GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as a ``QuantizedWeight``
    without salient columns. ``g_idx`` is kept only where it differs from the static ``j // group_size``
    (act-order checkpoints), so the common case keeps the cheap group expansion."""
    codes = unpack_rows(t["qweight"], bits, in_features).T.to(torch.uint8).contiguous()
    zero = unpack_rows(t["qzeros"].T.contiguous(), bits, out_features).float() + int(fmt == "gptq")
    scale = t["scales"].T.float().contiguous()
    g_idx = t["g_idx"].long()
    static = static_g_idx(in_features, group_size, scale.shape[1], g_idx.device)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero.contiguous(), bits=bits, group_size=group_size,
                           salient_idx=torch.zeros(0, dtype=torch.long, device=codes.device),
                           salient_weight=torch.zeros(out_features, 0, device=codes.device),
                           g_idx=None if torch.equal(g_idx, static) else g_idx)
