"""Noise injected into the frozen weights during GIFT-SW training (METHOD section 3).

    V(W) = [ W_salient , W_nonsalient + 1/2 * diag(Delta) * Omega ],  Omega ~ N(0, 1)

``Delta`` is the step of a ``noise_bits`` grid fitted (with the clipping search) to the non-salient
weights, per row; in the quantized setting the paper uses 4 bits whatever the model's bits.
``uniform`` noise ``(U(0,1) - 1/2) * Delta`` is true rounding noise (std ``Delta / sqrt(12)``).
The noise is a pure function of a seed, so a backward pass can redraw exactly the noise of its
forward pass instead of storing it.
"""
from __future__ import annotations

from typing import Literal

import torch

from .grid import Grid, row_params

NoiseKind = Literal["gaussian", "uniform", "none"]


@torch.no_grad()
def noise_step(w: torch.Tensor, mask: torch.Tensor, bits: int, kind: NoiseKind = "gaussian", clip_min: float = 0.2,
               clip_steps: int = 81) -> torch.Tensor:
    """Per-row step ``Delta`` (out, 1) of a symmetric ``bits`` grid fitted to the columns in ``mask``;
    zeros for ``kind = "none"`` (the clipping search is most of the time of loading a model for inference)."""
    if kind == "none":
        return torch.zeros(w.shape[0], 1, device=w.device)
    scale, _ = row_params(w.float(), Grid(bits, clip_min=clip_min, clip_steps=clip_steps), mask)
    return scale


def generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator of a draw: on the noise's device (randn on a GPU takes a GPU generator)."""
    return torch.Generator(device=device).manual_seed(seed)


def draw(
    kind: NoiseKind, step: torch.Tensor, mask: torch.Tensor, shape: torch.Size, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """Noise of ``shape`` (out, in) from ``seed``: std ``step/2`` (gaussian) or uniform over one step;
    zero where ``mask`` (in,) is false (the salient columns). One weight-sized tensor: every factor is
    applied in place (a 7B layer's noise would otherwise take four weight-sized temporaries)."""
    if kind not in ("gaussian", "uniform"):
        raise ValueError(f"noise kind {kind!r}: expected 'gaussian' or 'uniform'")
    g = generator(step.device, seed)
    if kind == "gaussian":
        omega = torch.randn(shape, generator=g, device=step.device, dtype=dtype).mul_(0.5)
    else:
        omega = torch.rand(shape, generator=g, device=step.device, dtype=dtype).sub_(0.5)
    return omega.mul_(step.to(dtype)).mul_(mask.to(dtype))
