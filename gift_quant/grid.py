"""Uniform quantization grid: pure functions on tensors.

Conventions (METHOD section 2, GPTQ v1 compatible):

* codes are unsigned integers in ``0 .. 2^b - 1``; ``w ~= scale * (code - zero)``.
* symmetric (``sym_step="paper"``): ``Delta = alpha / (2^(b-1) - 1)``, ``zero = 2^(b-1)``, so the
  signed levels are ``-2^(b-1) .. 2^(b-1) - 1`` exactly as the paper writes them.
  ``sym_step="gptq"`` is the convention of the GPTQ tools: ``Delta = 2 alpha / (2^b - 1)``, a step
  ``(2^b - 2) / (2^b - 1)`` times finer that clips the positive extreme by one step; it is what
  gptqmodel/auto-gptq do and matters a lot at 3 bits on models with outlier weights.
* asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``.
* parameters are per output row (``group_size = -1``) or per row and group of ``group_size``
  consecutive input columns (static groups: ``group(j) = j // group_size``), computed from the
  columns in ``mask`` only, so the full-precision salient columns never inflate the step.
* ``alpha`` comes from a linear search over clipping ratios ``p * max|w|`` minimising the squared
  error of the row (or row-group), as METHOD prescribes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch


@dataclass(frozen=True)
class Grid:
    """Everything that defines a uniform grid and how its parameters are chosen."""

    bits: int
    group_size: int = -1  # -1: one group per row
    sym: bool = True
    sym_step: Literal["paper", "gptq"] = "paper"
    clip_min: float = 1.0  # smallest clipping ratio searched
    clip_steps: int = 1  # ratios in linspace(1, clip_min, clip_steps); 1 disables the search


def maxq(bits: int) -> int:
    """Largest code of a ``bits``-wide unsigned grid."""
    return 2**bits - 1


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for rows with value range ``[xmin, xmax]`` (``xmin <= 0 <= xmax``)."""
    bits = grid.bits
    if grid.sym:
        alpha = torch.maximum(xmax, -xmin)
        scale = alpha / (2 ** (bits - 1) - 1) if grid.sym_step == "paper" else 2 * alpha / maxq(bits)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (xmax - xmin) / maxq(bits)
        zero = torch.zeros_like(scale)
    empty = scale == 0  # an all-zero (or fully masked) row: any positive step represents it exactly
    scale = torch.where(empty, torch.ones_like(scale), scale)
    if not grid.sym:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (``scale``/``zero`` broadcast against ``w``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` to the nearest grid point and back."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward (exactly: ``x + (round(x) - x).detach()`` may be off by a rounding), identity backward
    (the straight-through estimator)."""
    return _RoundSTE.apply(x)


def fake_quantize_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (clamp(round(w / scale) + zero, 0, maxq) - zero)`` of a weight ``(out, in)`` on its grid
    (``scale``, ``zero``: ``(out, n_groups)``), differentiable in all three (EfficientQAT's quantizer).

    The roundings (of ``w / scale`` and of a trained zero point) pass gradients straight through; the clamp passes
    none to a weight beyond the grid's ends. So, per weight, with ``q`` its code: ``d/dw = 1`` inside the grid and 0
    beyond it; ``d/dscale = q - zero - w / scale`` inside and ``q - zero`` beyond; ``d/dzero = 0`` inside (it
    cancels) and ``-scale`` beyond. Its value is exactly ``dequantize(quantize(w, s, z), s, z)`` with ``z`` rounded:
    the codes a trained latent weight freezes to give what training saw."""
    n_in = w.shape[1]
    s = expand_groups(scale, group_size, n_in, g_idx)
    z = expand_groups(round_ste(zero).clamp(0, maxq(bits)), group_size, n_in, g_idx)
    return (torch.clamp(round_ste(w / s) + z, 0, maxq(bits)) - z) * s


def row_params(w: torch.Tensor, grid: Grid, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of shape ``(rows, 1)`` for a 2-D ``w``.

    Only entries where ``mask`` is true take part (range and error). With ``clip_min < 1`` the
    range is shrunk by each ratio of ``linspace(1, clip_min, clip_steps)`` and every row keeps the
    ratio of least squared error (the first such ratio on a tie); ratio 1 is always a candidate, so the
    search is never worse than no clipping. All ratios are scored at once from each row sorted once
    (``clip_errors``), not by rounding the row once a ratio, a chunk of rows at a time (``search_rows``): the
    search's memory is bounded whatever the weight (a 7B layer at groups of 128 has half a million rows, and
    every candidate of each is a few float64 numbers).
    """
    w = w.float()
    wm = w if mask is None else torch.where(mask, w, 0.0)  # one weight-sized tensor at most: 7B layers are large
    xmin = wm.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = wm.max(dim=1, keepdim=True).values.clamp(min=0)
    if grid.clip_steps <= 1 or grid.clip_min >= 1.0:
        return _params_from_range(xmin, xmax, grid)
    r = torch.linspace(1.0, grid.clip_min, grid.clip_steps, device=w.device).view(-1, 1, 1)
    step = search_rows(w.shape[1], grid)
    scales, zeros = [], []
    for part, lo, hi in zip(wm.split(step), xmin.split(step), xmax.split(step)):
        scale, zero = _params_from_range(r * lo, r * hi, grid)  # (ratios, rows, 1)
        err = clip_errors(part, scale, zero, grid.bits)
        # equal errors (a row that two ratios represent alike) differ by rounding alone: within it, the first ratio
        tied = err <= err.min(0).values + _TIE * torch.linalg.vector_norm(part, dim=1, keepdim=True).double() ** 2
        pick = tied.to(torch.uint8).argmax(0, keepdim=True)  # argmax: the first of the tied
        scales.append(scale.gather(0, pick).squeeze(0))
        zeros.append(zero.gather(0, pick).squeeze(0))
    return torch.cat(scales), torch.cat(zeros)


_SEARCH_ELEMENTS = 2**22  # entries of a work tensor of the clipping search at once (float64: 32 MiB each)
_TIE = 1e-10  # errors this close, relative to the row's sum of squares, are one error


def search_rows(g: int, grid: Grid) -> int:
    """Rows of ``g`` entries that the clipping search scores at once: the row, or its thresholds of every
    candidate (``clip_steps * maxq``), fill a work tensor of ``_SEARCH_ELEMENTS``."""
    return max(1, _SEARCH_ELEMENTS // max(g, grid.clip_steps * maxq(grid.bits)))


def search_bytes(rows: int, g: int, grid: Grid) -> int:
    """Peak bytes of the clipping search over ``rows`` rows of ``g`` entries (the memory plan's term), in
    ``clip_errors`` for a chunk of ``search_rows``: the chunk's rows sorted in float64 beside their prefix sums (24
    bytes an entry while the sums are padded, 16 after), then six float64 tensors of the thresholds,
    ``clip_steps * maxq`` a row (the codes below each, the thresholds, their counts, the gathered prefix sums, the
    counts times the thresholds and the difference); throughout, each candidate's scale and zero point in float32
    and float64 (24 bytes a candidate and row; 32 planned, as measured at 2 bits, where the candidates weigh most).
    Nothing where the search is off (``benchmarks/bench_plan.py --tables gptq``)."""
    if grid.clip_steps <= 1 or grid.clip_min >= 1.0:
        return 0
    r = min(rows, search_rows(g, grid))
    thresholds = grid.clip_steps * maxq(grid.bits)
    return r * (max(24 * g, 16 * g + 48 * thresholds) + 32 * grid.clip_steps)


def clip_errors(wm: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared rounding error of each row of ``wm`` (rows, g) on each candidate grid (``scale``, ``zero``:
    (candidates, rows, 1)), over the entries the mask kept (the others are zero in ``wm``): ``(candidates,
    rows, 1)``, in float64. Its work tensors hold ``candidates * maxq`` entries a row (``row_params`` calls it
    a chunk of rows at a time).

    Why sorted: with the zero point taken off, the codes ``c`` run from ``-zero`` to ``top = maxq - zero``, and
    code ``c`` takes the entries between the thresholds ``t = (c -/+ 1/2) * s`` (the clamp puts everything
    beyond the extreme ones into the extreme codes). Summed by parts over the codes, with ``N_t`` and ``S_t`` the
    count and the sum of the entries below threshold ``t``,

        sum (w - s c(w))^2 = sum w^2 + s top (g s top - 2 sum w) + 2 s sum_t (S_t - N_t t),

    and with the row sorted once, ``N_t`` is a binary search and ``S_t`` a prefix sum: a candidate costs
    ``maxq`` searches instead of a pass over the row. An entry within a rounding of a threshold may land on the
    other side than ``round(w / s)`` puts it, where its error is the same to that rounding. A masked entry is
    zero, which lies in the code of level zero: it adds nothing."""
    g = wm.shape[1]
    v = wm.sort(dim=1).values.double()
    prefix = torch.nn.functional.pad(v.cumsum(1), (1, 0))  # prefix[:, i]: the sum of the i smallest
    s, z = scale.double().squeeze(-1).T, zero.double().squeeze(-1).T  # (r, candidates)
    codes = torch.arange(maxq(bits), dtype=torch.float64, device=wm.device) - z.unsqueeze(-1)  # below each t
    t = ((codes + 0.5) * s.unsqueeze(-1)).flatten(1)  # (r, candidates * maxq)
    n = torch.searchsorted(v, t)
    inner = (prefix.gather(1, n) - n * t).view(*s.shape, -1).sum(-1)
    top = (maxq(bits) - z) * s
    err = top * (g * top - 2 * prefix.narrow(1, g, 1)) + 2 * s * inner + v.pow(2).sum(1, keepdim=True)
    return err.T.unsqueeze(-1)


def grid_params(w: torch.Tensor, grid: Grid, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of shape ``(out, n_groups)`` for a weight ``(out, in)``.

    ``mask`` is a boolean vector over input columns (true = quantized, false = salient).
    ``group_size = -1`` gives one group per row. A last partial group is handled by padding with
    masked-out zeros.
    """
    out, n_in = w.shape
    g = n_in if grid.group_size == -1 else grid.group_size
    n_groups = -(-n_in // g)
    pad = n_groups * g - n_in
    if n_groups == 1:  # one group a row: the weight as it is, the column mask broadcast over its rows
        return row_params(w.float(), grid, None if mask is None else mask.bool())
    colmask = torch.ones(n_in, dtype=torch.bool, device=w.device) if mask is None else mask.bool()
    wp = torch.nn.functional.pad(w.float(), (0, pad))
    mp = torch.nn.functional.pad(colmask, (0, pad), value=False)
    rows = wp.reshape(out * n_groups, g)
    rmask = mp.reshape(1, n_groups, g).expand(out, n_groups, g).reshape(out * n_groups, g)
    scale, zero = row_params(rows, grid, rmask)
    return scale.reshape(out, n_groups), zero.reshape(out, n_groups)


def expand_groups(p: torch.Tensor, group_size: int, n_in: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast per-group parameters ``(out, n_groups)`` to ``(out, n_in)``.

    ``g_idx`` (in,): the group of each input column where groups are not runs of consecutive columns
    (GPTQ checkpoints quantized with act-order, ``desc_act``, number groups in quantization order)."""
    if g_idx is not None:
        return p[:, g_idx]
    if group_size == -1:
        return p.expand(p.shape[0], n_in)
    return p.repeat_interleave(group_size, dim=1)[:, :n_in]


@dataclass
class QuantizedWeight:
    """A linear weight split into a quantized grid and full-precision salient columns.

    ``codes`` covers every column (the salient columns' codes are their own rounding, so that an
    export holding all columns quantized plus a correction stays exact); the effective weight
    replaces the salient columns by ``salient_weight``.
    """

    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, n_groups) float32
    zero: torch.Tensor  # (out, n_groups) float32
    bits: int
    group_size: int
    salient_idx: torch.Tensor  # (k,) int64, sorted
    salient_weight: torch.Tensor  # (out, k) float32
    g_idx: torch.Tensor | None = None  # (in,) int64 group of each column; None: j // group_size (static groups)
    # GPTQ's loss, 1/2 sum (w - q)^2 / [H^-1]_jj over the quantized columns (IST-DASLab's printed "error": with
    # H = 2 X^T X / n, the squared output error per calibration token); ``error_salient``: what GPTQ continued
    # over the salient columns would add to it, the error the full-precision columns avoid. 0-d tensors where
    # the weight is (read them once the layer is done: no host sync inside GPTQ). Not saved.
    error: torch.Tensor | None = None
    error_salient: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on ``device``."""
        return replace(self, **{f: getattr(self, f).to(device) for f in
                                ("codes", "scale", "zero", "salient_idx", "salient_weight", "g_idx", "error",
                                 "error_salient")
                                if getattr(self, f) is not None})

    def column_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of every weight, ``(out, in)`` each."""
        n_in = self.codes.shape[1]
        return (expand_groups(self.scale, self.group_size, n_in, self.g_idx),
                expand_groups(self.zero, self.group_size, n_in, self.g_idx))

    def dequantize_grid(self) -> torch.Tensor:
        """The all-columns-quantized weight ``(out, in)``."""
        return dequantize(self.codes.float(), *self.column_params())

    def effective_weight(self) -> torch.Tensor:
        w = self.dequantize_grid()
        w[:, self.salient_idx] = self.salient_weight.float()
        return w


def finalize(
    salient_weight: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    salient_idx: torch.Tensor,
) -> QuantizedWeight:
    """Pack the result of RTN or GPTQ (``salient_weight``: the final values of the ``salient_idx`` columns,
    (out, k)): salient columns get codes too (their rounding)."""
    n_in, bits, group_size = codes.shape[1], grid.bits, grid.group_size
    codes = codes.to(torch.uint8)
    if salient_idx.numel():
        s = expand_groups(scale, group_size, n_in)[:, salient_idx]
        z = expand_groups(zero, group_size, n_in)[:, salient_idx]
        codes[:, salient_idx] = quantize(salient_weight, s, z, bits).to(torch.uint8)
    return QuantizedWeight(
        codes=codes,
        scale=scale,
        zero=zero,
        bits=bits,
        group_size=group_size,
        salient_idx=salient_idx,
        salient_weight=salient_weight.clone(),
    )


def nonsalient_mask(n_in: int, salient_idx: torch.Tensor) -> torch.Tensor:
    """``(in,)`` true on the quantized columns, false on the salient ones, on ``salient_idx``'s device."""
    return torch.ones(n_in, dtype=torch.bool, device=salient_idx.device).index_fill_(0, salient_idx, False)


@torch.no_grad()  # a weight that requires grad would otherwise chain every clipping candidate into a graph
def rtn(w: torch.Tensor, grid: Grid, salient_idx: torch.Tensor) -> QuantizedWeight:
    """Round-to-nearest with ``salient_idx`` columns kept in full precision."""
    w = w.float()
    scale, zero = grid_params(w, grid, nonsalient_mask(w.shape[1], salient_idx))
    g, n_in = grid.group_size, w.shape[1]
    codes = quantize(w, expand_groups(scale, g, n_in), expand_groups(zero, g, n_in), grid.bits)
    return finalize(w[:, salient_idx], codes, scale, zero, grid, salient_idx)
