"""The GIFT-SW layer: a frozen base plus trainable salient columns (PEFT-style wrapper).

    y = x @ base(W)^T + x[..., idx] @ W_s^T (+ bias)

* ``base`` is the frozen non-salient part, zero on the salient columns: integer codes with per-row
  or per-group scale/zero (``QuantBase``, one byte a weight) after quantization, or the original
  dense weight (``DenseBase``) for full-precision / pre-quantization GIFT-SW.
* ``salient_weight`` (out, k) is what trains, kept in float32 (the optimizer's master copy) whatever the
  compute dtype. Its gradient comes from the small product with the gathered inputs: no full weight
  gradient is ever formed. Optionally the grid's scales train too (``learn_scales``), or, block by block
  in reconstruction, every quantized weight (``QuantBase.learn_weights``: a latent weight rounded onto the
  grid in the forward pass, frozen back to codes afterwards).
* In training mode noise is added to the base (see ``noise.py``); the frozen product is a custom
  autograd function that rebuilds the dequantized, noised weight from a seed in the backward pass
  instead of keeping it alive between forward and backward.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .grid import QuantizedWeight, expand_groups, fake_quantize_ste, maxq, nonsalient_mask, quantize
from .kernels import Packed, pack
from .noise import NoiseKind, draw, noise_step
from .pack import static_g_idx


class QuantBase(nn.Module):
    """Codes (uint8) and grid parameters of the non-salient weights; salient codes sit at the zero point."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        codes = qw.codes.clone()
        codes[:, qw.salient_idx] = qw.column_params()[1][:, qw.salient_idx].to(torch.uint8)  # dequantizes to 0
        self.register_buffer("codes", codes)
        self.register_buffer("scale", qw.scale.float().clone())
        self.register_buffer("zero", qw.zero.float().clone())
        self.register_buffer("g_idx", None if qw.g_idx is None else qw.g_idx.long().clone())
        self.bits, self.group_size = qw.bits, qw.group_size
        self._packed: tuple[tuple, Packed | None] = ((), None)  # (what it was packed from, the packed grid)

    def packed(self, dtype: torch.dtype) -> Packed | None:
        """The grid packed for a torch integer matmul with activations of ``dtype`` (None: no kernel takes it),
        built on first use and again when the codes or grid parameters move or change."""
        if not kernels.ENABLED:
            return None
        key = (self.codes.device, dtype, self.codes._version, self.scale._version, self.zero._version)
        if self._packed[0] != key:
            self._packed = (key, pack(self.codes, self.scale, self.zero, self.group_size, self.g_idx, dtype))
        return self._packed[1]

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``scale * (codes - zero)`` in ``dtype``: a new tensor, and the only weight-sized one.

        The codes are cast first and the grid parameters (one per row and group) broadcast onto them in
        place over an ``(out, groups, group_size)`` view; expanding scale and zero to ``(out, in)`` would
        add two weight-sized copies to every forward, recompute and backward. Act-order checkpoints
        (``g_idx``) gather their parameters per column instead. A base that trains its weights
        (``learn_weights``) gives its latent weight quantized on the grid, differentiably."""
        if self.trains_weights:
            w = fake_quantize_ste(self.latent, self.scale, self.zero, self.bits, self.group_size, self.g_idx)
            return torch.where(self.keep, w, 0.0).to(dtype)
        out, n = self.codes.shape
        w = self.codes.to(dtype)
        s, z = self.scale.to(dtype), self.zero.to(dtype)
        if self.g_idx is not None:
            return w.sub_(z[:, self.g_idx]).mul_(s[:, self.g_idx])
        if self.group_size == -1:
            return w.sub_(z).mul_(s)
        g = self.group_size
        whole = n // g
        head = w[:, : whole * g].view(out, whole, g)
        head.sub_(z[:, :whole, None]).mul_(s[:, :whole, None])
        if whole * g < n:  # a last partial group
            w[:, whole * g :].sub_(z[:, whole:]).mul_(s[:, whole:])
        return w


    def learn_scales(self) -> None:
        """Make the grid's scales a trained parameter (the codes and zero points stay frozen)."""
        if not isinstance(self.scale, nn.Parameter):
            self.scale = nn.Parameter(self._buffers.pop("scale"), requires_grad=True)

    def learn_weights(self, latent: torch.Tensor, keep: torch.Tensor) -> None:
        """Train every weight (EfficientQAT's Block-AP): ``latent`` (out, in), a full-precision weight quantized in
        each forward on the grid (``grid.fake_quantize_ste``), becomes a parameter with the grid's scales and, where
        the grid is asymmetric (some zero point off the middle code), its zero points. Only the columns in ``keep``
        (in,) count; the others (the salient columns) stay zero. ``freeze`` turns it back into codes."""
        self.keep = keep.bool()
        self.latent = nn.Parameter(torch.where(self.keep, latent.float(), 0.0).to(self.codes.device))
        self.learn_scales()
        if not bool((self.zero == 2 ** (self.bits - 1)).all()):
            self.zero = nn.Parameter(self._buffers.pop("zero"), requires_grad=True)

    @property
    def trains_weights(self) -> bool:
        return "latent" in self._parameters

    @torch.no_grad()
    def freeze(self) -> None:
        """After ``learn_weights``: the codes of the latent weight (the quantized columns'; the salient columns keep
        theirs) with the zero points rounded as the forward rounds them; scales and zeros buffers again."""
        n = self.codes.shape[1]
        scale, zero = self.scale.detach().clone(), self.zero.detach().round().clamp(0, maxq(self.bits))
        codes = quantize(self.latent, expand_groups(scale, self.group_size, n, self.g_idx),
                         expand_groups(zero, self.group_size, n, self.g_idx), self.bits).to(torch.uint8)
        self.codes = torch.where(self.keep, codes, self.codes)
        for name in ("latent", "scale", "zero"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        del self.keep

    def scale_grad(self, grad_w: torch.Tensor) -> torch.Tensor:
        """``d loss / d scale`` from the gradient of the frozen weight ``grad_w`` (out, in) float32: the sum over
        each row's group of ``grad_w * (codes - zero)`` (``W = scale * (codes - zero)``, noise independent of it).
        Salient columns sit at the zero point and add nothing. ``grad_w`` is overwritten."""
        n = self.codes.shape[1]
        dq = grad_w.mul_(self.codes.float().sub_(expand_groups(self.zero, self.group_size, n, self.g_idx)))
        groups = self.g_idx if self.g_idx is not None else static_g_idx(n, self.group_size, self.scale.shape[1],
                                                                        dq.device)
        return torch.zeros_like(self.scale).index_add_(1, groups, dq)


class DenseBase(nn.Module):
    """The original weight, frozen, with the salient columns zeroed (a copy: the weight given is not changed)."""

    def __init__(self, weight: torch.Tensor, salient_idx: torch.Tensor):
        super().__init__()
        w = weight.detach().clone()
        w[:, salient_idx] = 0
        self.register_buffer("dense", w)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dense.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear of input ``x`` computes in: autocast's where it is on for ``x``'s device, else ``x``'s."""
    kind = x.device.type
    on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    return torch.get_autocast_dtype(kind) if on else x.dtype


class _FrozenProduct(torch.autograd.Function):
    """``x @ W^T`` for a frozen ``W = layer.base_weight(seed)`` rebuilt in backward, not saved.

    The weight is built once in the compute dtype (under autocast: autocast's, not a float32 model's) and
    rebuilt in backward in that same dtype, so both passes use the very same noisy weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "SalientLinear", seed: int, scale: torch.Tensor | None) -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.layer, ctx.seed, ctx.dtype, ctx.x_dtype = layer, seed, dtype, x.dtype
        if scale is not None:  # learned scales: their gradient needs the input
            ctx.save_for_backward(x)
        return F.linear(x.to(dtype), layer.base_weight(dtype, seed))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_scale = None
        # in the dtypes written here, whatever the caller's autocast (under bfloat16 autocast the float32 weight
        # gradient would come out in bfloat16); a device without autocast (meta) has none to turn off
        kind = grad_out.device.type
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext():
            if ctx.needs_input_grad[0]:
                w = ctx.layer.base_weight(ctx.dtype, ctx.seed)
                grad_x = (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype)
                del w
            if ctx.needs_input_grad[3]:  # d loss / d W = grad_out^T x, one weight-sized float32 tensor, then per group
                x, = ctx.saved_tensors
                grad_w = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                grad_scale = ctx.layer.base.scale_grad(grad_w)
        return grad_x, None, None, grad_scale


class SalientLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` for GIFT-SW (see module docstring)."""

    def __init__(
        self,
        base: QuantBase | DenseBase,
        salient_idx: torch.Tensor,
        salient_weight: torch.Tensor,
        bias: torch.Tensor | None,
        noise_step_: torch.Tensor,
        noise: NoiseKind = "gaussian",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.base = base
        self.dtype = dtype  # of the linear it replaces: what merge_to_dense gives back
        self.register_buffer("salient_idx", salient_idx.long().clone())
        self.salient_weight = nn.Parameter(salient_weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("noise_step", noise_step_.float().clone())  # (out, 1): Delta of the noise grid
        self.noise = noise
        self.noise_factor = 1.0  # multiplies the noise; a schedule may anneal it
        self.out_features = salient_weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.codes.shape[1] if isinstance(self.base, QuantBase) else self.base.dense.shape[1]

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, noise: NoiseKind, noise_bits: int,
                       dtype: torch.dtype = torch.float32) -> "SalientLinear":
        base = QuantBase(qw)
        mask = nonsalient_mask(qw.codes.shape[1], qw.salient_idx)
        step = noise_step(base.weight(torch.float32), mask, noise_bits, noise)
        return cls(base, qw.salient_idx, qw.salient_weight, bias, step, noise, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, salient_idx: torch.Tensor, noise: NoiseKind, noise_bits: int,
                    device: torch.device | str | None = None) -> "SalientLinear":
        """Full-precision variant: the original weight stays dense; noise from a ``noise_bits`` grid. Built on
        ``device`` (default: the linear's) with one copy of the weight there; the linear is left where it is."""
        device = linear.weight.device if device is None else torch.device(device)
        w = linear.weight.detach().to(device)
        idx = salient_idx.to(device)
        mask = nonsalient_mask(w.shape[1], idx)
        step = noise_step(w, mask, noise_bits, noise)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(DenseBase(w, idx), idx, w[:, idx], bias, step, noise, w.dtype)

    @property
    def trains_weights(self) -> bool:
        return isinstance(self.base, QuantBase) and self.base.trains_weights

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """What in the layer trains, by role (each role its own learning rate): ``columns``, the salient weights;
        ``scales`` and ``zeros``, the grid's where they are learned (``learn_scales``, ``learn_weights``);
        ``weights``, the latent weight of the quantized columns (``learn_weights``)."""
        base = self.base._parameters if isinstance(self.base, QuantBase) else {}
        return {"columns": [self.salient_weight],
                **{role: [base[name]] if base.get(name) is not None and base[name].requires_grad else []
                   for role, name in (("scales", "scale"), ("zeros", "zero"), ("weights", "latent"))}}

    def write_to(self, qw: QuantizedWeight) -> None:
        """Put what training changed into ``qw``, the layer's grid as quantized (on its device): the salient columns,
        and the grid (learned or not): scales, and codes and zero points, which only ``learn_weights`` changes (its
        latent weight frozen first); bits, groups and indices never change."""
        if self.trains_weights:
            self.base.freeze()
        qw.salient_weight = self.salient_weight.detach().to(qw.codes.device, copy=True)
        if isinstance(self.base, QuantBase):  # the base holds the salient columns' codes at the zero point: not those
            qw.codes = torch.where(self.noise_mask().to(qw.codes.device), self.base.codes.to(qw.codes.device), qw.codes)
            qw.scale, qw.zero = (t.detach().to(qw.codes.device, copy=True) for t in (self.base.scale, self.base.zero))

    def noise_mask(self) -> torch.Tensor:
        return nonsalient_mask(self.in_features, self.salient_idx)

    def base_weight(self, dtype: torch.dtype, seed: int | None) -> torch.Tensor:
        """Dense frozen weight (salient columns zero), plus the noise of ``seed`` if given (added into the
        noise tensor in place: no third weight-sized tensor)."""
        w = self.base.weight(dtype)
        if seed is None:
            return w
        step = self.noise_step * self.noise_factor
        return draw(self.noise, step, self.noise_mask(), w.shape, seed, dtype).add_(w)

    def effective_weight(self) -> torch.Tensor:
        """The dense mixed weight used in eval mode (a new tensor)."""
        w = self.base.weight(self.salient_weight.dtype)
        if isinstance(self.base, DenseBase):
            w = w.clone()  # DenseBase.weight may return its own buffer
        w[:, self.salient_idx] = self.salient_weight.detach()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = self.training and self.noise != "none" and self.noise_factor > 0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if noisy else None
        y = self._packed_product(x) if seed is None else None
        if y is None and self.trains_weights:  # the base is trained too: autograd through its fake-quantized weight
            dtype = compute_dtype(x)
            y = F.linear(x.to(dtype), self.base_weight(dtype, seed))
        elif y is None:
            scale = self.base.scale if isinstance(self.base, QuantBase) and self.base.scale.requires_grad else None
            y = _FrozenProduct.apply(x, self, seed, scale)
        y = y + x[..., self.salient_idx] @ self.salient_weight.to(x.dtype).T
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """The frozen product through a packed integer kernel (``kernels``): for inference, where no gradient
        flows to ``x`` and there is no noise (eval mode: training keeps the dequantized product, so its numbers
        do not depend on which kernels a machine has); None where no kernel takes the grid."""
        if self.training or not isinstance(self.base, QuantBase) or self.trains_weights or (torch.is_grad_enabled() and (
                x.requires_grad or self.base.scale.requires_grad)):
            return None
        dtype = compute_dtype(x)
        packed = self.base.packed(dtype)
        return None if packed is None else packed(x.to(dtype))

    def extra_repr(self) -> str:
        kind = "quantized" if isinstance(self.base, QuantBase) else "dense"
        return f"in={self.in_features}, out={self.out_features}, k={self.salient_idx.numel()}, base={kind}, noise={self.noise}"


def replace_linears(model: nn.Module, make: dict[str, callable]) -> None:
    """Replace the modules named in ``make`` by ``make[name](old_module)`` and freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name, factory in make.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, factory(modules[name]))


def wrap_quantized(model: nn.Module, results: dict[str, QuantizedWeight], noise: NoiseKind, noise_bits: int,
                   device: torch.device | str | None = None) -> None:
    """Post-quantization GIFT-SW: every quantized linear becomes a ``SalientLinear`` on its codes, built on
    ``device`` (default: the codes'), where the noise grid's clipping search runs."""
    def make(lin: nn.Linear, qw: QuantizedWeight) -> SalientLinear:
        bias = None if lin.bias is None else lin.bias.to(device or qw.codes.device)
        return SalientLinear.from_quantized(qw.to(device) if device else qw, bias, noise, noise_bits, lin.weight.dtype)

    replace_linears(model, {name: (lambda lin, qw=qw: make(lin, qw)) for name, qw in results.items()})


def learn_scales(model: nn.Module) -> None:
    """Every quantized GIFT-SW layer's grid scales trained with its salient columns (E2E-QP): codes stay."""
    for layer in salient_layers(model).values():
        if isinstance(layer.base, QuantBase):
            layer.base.learn_scales()


def wrap_full_precision(model: nn.Module, salient: dict[str, torch.Tensor], noise: NoiseKind, noise_bits: int,
                        device: torch.device | str | None = None) -> None:
    """Full-precision / pre-quantization GIFT-SW: dense frozen base, noise from a ``noise_bits`` grid; each
    layer built on ``device`` (default: where it is)."""
    def make(lin: nn.Linear, idx: torch.Tensor) -> SalientLinear:
        return SalientLinear.from_linear(lin, idx, noise, noise_bits, device)

    replace_linears(model, {name: (lambda lin, idx=idx: make(lin, idx)) for name, idx in salient.items()})


def salient_layers(model: nn.Module) -> dict[str, SalientLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SalientLinear)}


def learn_weights(model: nn.Module, start: dict[str, torch.Tensor] | None = None) -> None:
    """Every quantized GIFT-SW layer trains its quantized columns' weights as well (``QuantBase.learn_weights``),
    from ``start[name]`` (the full-precision weight) or, without it, from its own dequantized codes."""
    for name, layer in salient_layers(model).items():
        if isinstance(layer.base, QuantBase):
            w = layer.base.weight(torch.float32) if start is None else start[name].to(layer.base.codes.device)
            layer.base.learn_weights(w, layer.noise_mask())


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trained parameters of every GIFT-SW layer of ``model``, by role (``SalientLinear.param_groups``)."""
    groups: dict[str, list[nn.Parameter]] = {"columns": [], "scales": [], "zeros": [], "weights": []}
    for layer in salient_layers(model).values():
        for role, params in layer.param_groups().items():
            groups[role] += params
    return groups


def merge_to_dense(model: nn.Module) -> None:
    """Replace every ``SalientLinear`` by an ``nn.Linear`` holding its effective weight, in the dtype of
    the linear it replaced. One layer at a time: each is released as its linear takes its place, so the peak is
    the model plus one layer's weight, not two models."""
    for name in list(salient_layers(model)):
        layer = model.get_submodule(name)
        w = layer.effective_weight().to(layer.dtype)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device="meta")
        lin.weight = nn.Parameter(w)
        if layer.bias is not None:
            lin.bias = nn.Parameter(layer.bias.to(w.dtype, copy=True))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
