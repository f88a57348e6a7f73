"""GPTQ with full-precision salient columns (OWQ / QUIK style).

The algorithm of Frantar et al. (IST-DASLab/gptq ``gptq.py``), weight only, with one change: the
salient columns are moved to the end of the processing order and never quantized. Every quantized
column's rounding error is spread over all columns that come after it, salient ones included
(``W[:, later] -= err * Hinv[i, later] / Hinv[i, i]``), so the full-precision columns absorb part of
the error of the others, as OWQ does. Their final values are the updated ones.

Grid parameters come from the original weight before any update (static groups: group of column
``j`` is ``j // group_size`` whatever the order), computed on the non-salient columns only. This keeps
``g_idx`` standard for GPTQ v1 export and makes act-order a pure change of processing order.
"""
from __future__ import annotations

import torch

from .quantize import Grid, QuantizedWeight, expand_groups, finalize, grid_params, nonsalient_mask, quantize


def processing_order(h_diag: torch.Tensor, salient_idx: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column order: non-salient columns (by decreasing Hessian diagonal with act-order), then salient."""
    n = h_diag.numel()
    is_salient = torch.zeros(n, dtype=torch.bool, device=h_diag.device)
    is_salient[salient_idx] = True
    rest = torch.nonzero(~is_salient).flatten()
    if act_order:
        rest = rest[torch.argsort(h_diag[rest], descending=True, stable=True)]
    return torch.cat([rest, salient_idx.to(rest.device)])


def dampen(h: torch.Tensor, w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``H`` positive definite: dead inputs get weight 0 and unit curvature, then ``+ damp * mean(diag H) * I``."""
    h = h.clone().double()
    w = w.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, w


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    salient_idx: torch.Tensor,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the input Hessian ``h = X^T X`` (in, in)."""
    n_in, bits = w.shape[1], grid.bits
    h, w = dampen(h, w.float(), damp)
    scale, zero = grid_params(w, grid, nonsalient_mask(n_in, salient_idx))
    col_scale = expand_groups(scale, grid.group_size, n_in)
    col_zero = expand_groups(zero, grid.group_size, n_in)

    perm = processing_order(torch.diag(h), salient_idx, act_order)
    w = w[:, perm].clone()
    h = h[perm][:, perm]
    s, z = col_scale[:, perm], col_zero[:, perm]
    # Upper Cholesky factor of H^-1: row i holds the OBS update for column i given columns < i fixed.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    n_q = n_in - salient_idx.numel()
    codes = torch.zeros_like(w)
    for i1 in range(0, n_q, block_size):
        i2 = min(i1 + block_size, n_q)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = quantize(col, s[:, i1 + i], z[:, i1 + i], bits)
            codes[:, i1 + i] = q
            err = (col - s[:, i1 + i] * (q - z[:, i1 + i])) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return finalize(w[:, inv], codes[:, inv], scale, zero, grid, salient_idx)
