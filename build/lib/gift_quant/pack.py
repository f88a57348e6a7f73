"""Bit packing in the GPTQ v1 layout (as auto-gptq / gptqmodel write it).

Codes are packed along the first dimension as a little-endian bit stream: 32 consecutive values
take ``bits`` int32 words, value ``r`` of a block starting at bit ``r * bits``. For 2, 4 and 8 bits
that is "value j in bits [bits*j, bits*(j+1)) of its word"; 3-bit values cross word boundaries
exactly as the GPTQ tools pack them. A first dimension that is not a multiple of 32 is padded with
zero codes.

    qweight: (ceil(in/32) * bits, out) int32   codes packed along the input dimension
    qzeros:  (n_groups, ceil(out/32) * bits) int32   (zero - 1) packed along the output dimension (v1)
    scales:  (n_groups, out) float16
    g_idx:   (in,) int32   group of each input column
"""
from __future__ import annotations

import torch

from .quantize import QuantizedWeight


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) integer codes in ``0..2^bits-1`` -> (ceil(n/32) * bits, m) int32."""
    n, m = codes.shape
    blocks = -(-n // 32)
    c = torch.zeros(blocks * 32, m, dtype=torch.int64)
    c[:n] = codes.to(torch.int64)
    c = c.reshape(blocks, 32, m)
    words = torch.zeros(blocks, bits, m, dtype=torch.int64)
    for r in range(32):
        for b in range(bits):
            p = r * bits + b
            words[:, p // 32] |= ((c[:, r] >> b) & 1) << (p % 32)
    words = words.reshape(blocks * bits, m)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: the first ``n`` rows of codes, int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    blocks = words.shape[0] // bits
    words = words.reshape(blocks, bits, -1)
    c = torch.zeros(blocks, 32, words.shape[-1], dtype=torch.int64)
    for r in range(32):
        for b in range(bits):
            p = r * bits + b
            c[:, r] |= ((words[:, p // 32] >> (p % 32)) & 1) << b
    return c.reshape(blocks * 32, -1)[:n]


def to_gptq_v1(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors of a layer with every column quantized (salient columns: their own rounding)."""
    in_f = qw.codes.shape[1]
    n_groups = qw.scale.shape[1]
    zero = qw.zero.round().to(torch.int64)
    if (zero < 1).any():
        raise ValueError("GPTQ v1 stores zero - 1 and cannot hold a zero point of 0 (an asymmetric grid of an "
                         "all-positive group); use sym: true for this export")
    g = in_f if qw.group_size == -1 else qw.group_size
    return {
        "qweight": pack_rows(qw.codes.T, qw.bits),
        "qzeros": pack_rows(zero - 1, qw.bits).T.contiguous(),
        "scales": qw.scale.T.contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_f) // g).clamp(max=n_groups - 1).to(torch.int32),
    }


def from_gptq_v1(t: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int) -> tuple[torch.Tensor, ...]:
    """``(codes (out, in) uint8, scale (out, n_groups), zero (out, n_groups))`` from GPTQ v1 tensors."""
    codes = unpack_rows(t["qweight"], bits, in_features).T.to(torch.uint8).contiguous()
    zero = unpack_rows(t["qzeros"].T.contiguous(), bits, out_features).float() + 1
    return codes, t["scales"].T.float().contiguous(), zero.contiguous()
