"""The frozen grid through torch's packed integer matmuls, for inference.

Dequantizing every weight on every forward (``QuantBase.weight``) reads the codes, writes a dense weight
and reads it again: slower than the dense model it replaces. torch ships matmuls that read packed
integers directly, and the grid maps onto them exactly (measured in ``benchmarks/RESULTS.md``: on the CPU they are fast for
bfloat16 activations only, their float32 and float16 paths are slower than a dense matmul, so a model
takes them when it runs in bfloat16):

* a per-row grid: ``scale * (q - z)`` is an int8 weight ``q - z`` (``z`` is an integer; ``|q - z| < 16``)
  times a per-row scale: ``aten._weight_int8pack_mm`` (CPU only: its CUDA kernel is a plain dot product per
  output, slower than dequantizing for cuBLAS);
* groups of 32, 64, 128 or 256 columns: torch's int4 convention ``(q4 - 8) * scale + zero`` takes the
  codes as they are (2, 3 and 4 bits fit in 4) with ``zero = (8 - z) * scale`` per group:
  ``aten._weight_int4pack_mm_for_cpu`` (CPU; ``out`` a multiple of 16) and ``aten._weight_int4pack_mm``
  (CUDA, bfloat16 activations).

What they do not cover (act-order ``g_idx``, other group sizes, a last partial group, shapes the kernels
refuse) keeps the dequantize-and-matmul path, and says so in the log once per reason. The kernels sum in
another order than a dense matmul: results agree to float rounding (tests state the tolerance), not bit
for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)
ENABLED = True  # False: every layer dequantizes (what the kernels are measured against, benchmarks/bench_export.py)
_said: set[str] = set()


@dataclass(frozen=True)
class Packed:
    """One layer's grid in a packed kernel's layout: ``kind`` int8 (per row), int4_cpu or int4 (CUDA)."""

    kind: str
    weight: torch.Tensor
    params: torch.Tensor  # int8: (out,) scales; int4: (groups, out, 2) scales and zeros
    group_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for ``x`` (..., in) in the dtype the layer was packed for."""
        flat = x.reshape(-1, x.shape[-1])
        if self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.params)
        elif self.kind == "int4_cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.params)
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.weight, self.group_size, self.params)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, g_idx: torch.Tensor | None,
         dtype: torch.dtype) -> Packed | None:
    """The grid ``scale * (codes - zero)`` (codes ``(out, in)`` uint8 on their device, parameters ``(out, groups)``)
    packed for activations of ``dtype``, or None (logged once) where no kernel takes it."""
    if codes.device.type == "meta":  # shapes only: nothing to pack
        return None
    try:
        why = _unsupported(codes, zero, group_size, g_idx, dtype)
        if why is None:
            packed = _pack(codes, scale, zero, group_size, dtype)
            packed(torch.zeros(1, codes.shape[1], dtype=dtype, device=codes.device))  # the kernel runs here
            return packed
    except (RuntimeError, NotImplementedError) as e:  # a build or device without the kernel
        why = f"the packed kernel failed on {codes.device.type} ({(str(e).splitlines() or [''])[0][:120]})"
    if why not in _said:
        _said.add(why)
        log.info("gift layers: %s; those layers dequantize their weight every forward instead", why)
    return None


def _unsupported(codes: torch.Tensor, zero: torch.Tensor, group_size: int, g_idx: torch.Tensor | None,
                 dtype: torch.dtype) -> str | None:
    out, n_in = codes.shape
    if dtype != torch.bfloat16:  # torch's CPU kernels are reference loops in float32 / float16 (slower than dense)
        return f"{dtype} activations: the packed kernels run fast in bfloat16 only (load the model in bfloat16)"
    if g_idx is not None:
        return "act-order groups (g_idx) have no packed kernel"
    if group_size == -1 and codes.device.type != "cpu":  # torch's CUDA int8 kernel: a plain dot product per output
        return f"per-row grids on {codes.device.type}: no packed kernel there beats dequantizing for the dense matmul"
    if not bool((zero == zero.round()).all()):
        return "zero points that are not integers have no packed kernel"
    if group_size == -1:
        return None
    if group_size not in INT4_GROUPS or n_in % group_size:
        return f"groups of {group_size} over {n_in} inputs: the int4 kernels take whole groups of {list(INT4_GROUPS)}"
    if int(codes.max()) > 15:
        return "codes of more than 4 bits in groups have no packed kernel"
    if codes.device.type == "cpu" and out % 16:
        return f"{out} outputs: the CPU int4 kernel takes multiples of 16"
    return None


def _pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype) -> Packed:
    if group_size == -1:
        w = (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8).contiguous()
        return Packed("int8", w, scale[:, 0].to(dtype).contiguous(), -1)
    params = torch.stack([scale.T, ((8 - zero) * scale).T], -1).to(dtype).contiguous()
    if codes.device.type == "cpu":
        return Packed("int4_cpu", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
                      params, group_size)
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
    return Packed("int4", torch.ops.aten._convert_weight_to_int4pack(pairs, 8), params, group_size)
