"""GPTQ with full-precision salient columns (OWQ / QUIK style).

The algorithm of Frantar et al. (IST-DASLab/gptq ``gptq.py``), weight only, with one change: the
salient columns are moved to the end of the processing order and never quantized. Every quantized
column's rounding error is spread over all columns that come after it, salient ones included
(``W[:, later] -= err * Hinv[i, later] / Hinv[i, i]``), so the full-precision columns absorb part of
the error of the others, as OWQ does. Their final values are the updated ones.

Group membership is always ``j // group_size`` (a standard ``g_idx`` for GPTQ v1 export), and grid
parameters are computed on the non-salient columns only. *When* they are computed is a choice:

* static groups (``dynamic_groups=False``): from the original weight before any update, so act-order
  is a pure change of processing order;
* dynamic groups (``dynamic_groups=True``, what the GPTQ tools do without act-order): when GPTQ
  reaches a group's first column, from the group's weights *as already updated* by the error of all
  earlier columns. At 3 bits those updates are large and a grid fitted before them is badly placed.
  Blocks are cut at group boundaries so a whole group is in hand when its parameters are fitted.
  IST-DASLab/gptq and gptqmodel fit a group on the full matrix, which lags behind by the updates of
  the earlier columns of the current block; the two agree when a group spans whole blocks (group 128,
  block 128: tested equal to gptqmodel's ``GPTQ`` class) and ours sees more of the update otherwise.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .grid import Grid, QuantizedWeight, finalize, grid_params, nonsalient_mask, quantize, row_params

log = logging.getLogger(__name__)


def processing_order(h_diag: torch.Tensor, salient_idx: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column order: non-salient columns (by decreasing Hessian diagonal with act-order, ties by index), then
    the salient ones as given. Two stable sorts instead of ``nonzero``, so the order needs no values on the
    host (a GPU run does not wait for it)."""
    n = h_diag.numel()
    order = (torch.argsort(h_diag, descending=True, stable=True) if act_order
             else torch.arange(n, device=h_diag.device))
    is_salient = torch.zeros(n, dtype=torch.uint8, device=h_diag.device).index_fill_(0, salient_idx, 1)
    rest = order.index_select(0, torch.argsort(is_salient.index_select(0, order), stable=True))
    rest = rest[: n - salient_idx.numel()]
    return torch.cat([rest, salient_idx.to(rest.device)])


def damping(diag: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (zero curvature) and the damped diagonal of ``H``: dead entries 1, then ``+ damp * mean``."""
    dead = diag == 0
    d = diag.masked_fill(dead, 1)
    return dead, d + damp * torch.mean(d)


def dampen(h: torch.Tensor, w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``H`` positive definite: dead inputs get weight 0 and unit curvature, then ``+ damp * mean(diag H) * I``."""
    dead, diag = damping(torch.diag(h), damp)
    h = h.clone()
    h.diagonal().copy_(diag)
    return h, w.masked_fill(dead, 0)


def _damped_permuted(h: torch.Tensor, diag: torch.Tensor, perm: torch.Tensor, dtype: torch.dtype,
                     scale: float = 1.0) -> torch.Tensor:
    """``dampen(scale * h)[perm][:, perm]`` in ``dtype`` from one gather of ``h`` (``diag``: its damped diagonal),
    laid out column-major: LAPACK's order, so the in-place factorization needs no internal copy and the factor
    has the layout (hence the later matmuls the rounding) of the out-of-place one. The scale is applied to the
    gathered copy: the same products as scaling first, without a copy of the whole Hessian for it."""
    hp = h.to(dtype).mT[perm[:, None], perm].mT
    if scale != 1.0:
        hp.mul_(scale)
    hp.diagonal().copy_(diag.to(dtype)[perm])
    return hp


def inverse_cholesky(h: torch.Tensor, original: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` in float32, as the GPTQ tools compute it, in place: ``h``'s memory
    holds the result (a 7B layer's Hessian is 0.5 GB in float32; factor, inverse and factor again need no
    second copy).

    Row ``i`` holds the OBS update for column ``i`` given columns ``< i`` fixed. Damping bounds the
    condition number by about ``in_features / damp``; should float32 still fail to factor, float64 does,
    from ``original()`` (``h`` is overwritten by then; default: a copy of ``h`` kept beforehand).
    """
    keep = h.clone() if original is None else None
    u = _factor_inverse_(h.float())
    if u is None:
        log.warning("GPTQ: the damped Hessian (%d inputs) or its inverse did not factor in float32; using float64",
                    h.shape[0])
        u = _factor_inverse_(keep.double() if original is None else original().double())
    if u is None:
        raise ValueError(f"quant.damp: the damped Hessian ({h.shape[0]} inputs) is not positive definite even in "
                         "float64; raise quant.damp (the GPTQ tools use 0.01-0.1)")
    return u.float()


def _factor_inverse_(h: torch.Tensor) -> torch.Tensor | None:
    """``inverse_cholesky``'s three LAPACK steps in ``h``'s memory; None when ``h`` or its inverse does not factor
    (near the edge of float32 either can fail first, depending on the machine's LAPACK)."""
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if info != 0:
        return None
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    return None if info != 0 else h


def _float64(h: torch.Tensor, perm: torch.Tensor, damp: float) -> torch.Tensor:
    """The damped, permuted Hessian in float64, for the rare layer whose float32 one does not factor."""
    return _damped_permuted(h, damping(torch.diag(h).double(), damp)[1], perm, torch.float64)


@torch.no_grad()
def compensate(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor, salient_idx: torch.Tensor,
               damp: float) -> torch.Tensor:
    """Salient columns ``(out, k)`` that absorb the error of a quantization made without them in mind.

    When the non-salient columns are frozen at ``q`` by someone else (an imported GPTQ checkpoint), GPTQ
    never pushed their rounding error into the columns we keep, and their original values ``W_s`` are
    not the best ones beside ``q``. On inputs ``X`` (``H = X^T X``) the least-squares choice is

        argmin_Ws ||X_s Ws^T + X_r Q_r^T - X W^T||^2  =  W_s - (Q_r - W_r) H_rs H_ss^-1

    the same correction GPTQ's last steps make to the columns it leaves unquantized (``H_ss`` damped as
    in ``dampen``)."""
    if salient_idx.numel() == 0:
        return w[:, salient_idx].float()
    rest = nonsalient_mask(w.shape[1], salient_idx)
    h = hessian.float()
    h_ss, _ = dampen(h[salient_idx][:, salient_idx], w[:, salient_idx], damp)
    err = (q - w)[:, rest].float()
    return w[:, salient_idx].float() - torch.linalg.solve(h_ss, (err @ h[rest][:, salient_idx]).T).T


@torch.no_grad()
def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    salient_idx: torch.Tensor,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    dynamic_groups: bool = False,
    h_scale: float = 1.0,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given the input Hessian ``h_scale * h`` (in, in), ``h = X^T X``: the statistics'
    sum can come as it is (``InputStats.hessian`` with its ``gptq_scale``), never copied whole.

    Memory beside the inputs: one dampened, permuted copy of ``h`` (factored in place into ``H^-1``'s factor)
    and a few of ``w``; grid parameters stay one per row and group, read per column by its group."""
    n_in, bits, dynamic = w.shape[1], grid.bits, dynamic_groups and grid.group_size != -1
    if dynamic and act_order:
        raise ValueError("dynamic groups need the natural column order; act_order would scatter each group")
    dead, diag = damping(torch.diag(h).float() * h_scale, damp)
    w = w.float().masked_fill(dead, 0)
    scale, zero = grid_params(w, grid, nonsalient_mask(n_in, salient_idx))

    perm = processing_order(diag, salient_idx, act_order)
    w = w[:, perm]
    hinv = inverse_cholesky(_damped_permuted(h, diag, perm, torch.float32, h_scale),
                            lambda: _float64(h * h_scale, perm, damp))
    # the group of each processed column (one per row: group 0); read on the host once per layer
    group_of = [0] * n_in if scale.shape[1] == 1 else (perm // grid.group_size).clamp(max=scale.shape[1] - 1).tolist()

    n_q = n_in - salient_idx.numel()
    cuts, group_end = _blocks(n_q, block_size, group_of, grid.group_size if dynamic else None)
    codes = torch.zeros_like(w, dtype=torch.uint8)  # codes are small integers: exact in a byte
    loss = torch.zeros((), device=w.device)  # on the device: no host sync per block
    for i1, i2 in zip(cuts, cuts[1:] + [n_q]):
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i1 + i in group_end:  # dynamic groups: fit this group on its current weights
                j1, j2 = i1 + i, group_end[i1 + i]
                gs, gz = row_params(w1[:, i : i + j2 - j1], grid)
                scale[:, group_of[j1]], zero[:, group_of[j1]] = gs[:, 0], gz[:, 0]
            col = w1[:, i]
            sc, zc = scale[:, group_of[i1 + i]], zero[:, group_of[i1 + i]]
            q = quantize(col, sc, zc, bits)
            codes[:, i1 + i] = q
            err = (col - sc * (q - zc)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        loss += err1.pow(2).sum()

    # the salient columns are the last of the processing order, in salient_idx's order
    out = finalize(w[:, n_q:], codes[:, torch.argsort(perm)], scale, zero, grid, salient_idx)
    groups, out.error = torch.tensor(group_of[n_q:], dtype=torch.long, device=w.device), loss / 2
    out.error_salient = salient_error(w[:, n_q:], hinv[n_q:, n_q:], scale[:, groups], zero[:, groups], bits)
    return out


def _blocks(n_q: int, block_size: int, group_of: list[int], dynamic_group: int | None) -> tuple[list[int], dict]:
    """Where the lazy blocks of the ``n_q`` quantized columns start, and for dynamic groups (``dynamic_group``: their
    size) where each group that starts at a position ends: blocks are then whole groups."""
    if dynamic_group is None:
        return list(range(0, n_q, block_size)), {}
    starts = [p for p in range(n_q) if p == 0 or group_of[p] != group_of[p - 1]]
    return starts[:: max(1, block_size // dynamic_group)], dict(zip(starts, starts[1:] + [n_q]))


def salient_error(ws: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """GPTQ's loss were it to go on over the salient columns ``ws`` (out, k) as they end, in their processing
    order, with ``hinv`` their block of ``H^-1``'s Cholesky factor and their grid parameters (out, k): the
    error that keeping them in full precision avoids. ``k`` steps of the column loop on a copy."""
    ws, loss = ws.clone(), torch.zeros((), device=ws.device)
    for j in range(ws.shape[1]):
        col = ws[:, j]
        q = quantize(col, scale[:, j], zero[:, j], bits)
        err = (col - scale[:, j] * (q - zero[:, j])) / hinv[j, j]
        ws[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
        loss += err.pow(2).sum()
    return loss / 2
