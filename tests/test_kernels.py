"""Packed integer matmuls of the frozen grid against the dequantized reference (``effective_weight``).

The kernels take bfloat16 activations (their float32 paths are slow reference loops): the reference is the
same weight, from bfloat16 scales, applied in float32 to the bfloat16 input; the kernel rounds its output
to bfloat16, so the tolerance is bfloat16's (2^-8 relative).
"""
import pytest
import torch

from gift_quant import kernels
from gift_quant.grid import Grid, expand_groups, rtn
from gift_quant.layers import SalientLinear, merge_to_dense, salient_layers, wrap_quantized
from gift_quant.quantize import rtn_with_columns

from .conftest import tiny_llama


def layer(bits, group, sym, out=64, n_in=128, g_idx=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    qw = rtn(w, Grid(bits, group, sym), torch.tensor([5, 17, 90]))
    qw.salient_weight += 0.1  # trained columns differ from the grid's
    if g_idx:
        qw.g_idx = torch.randperm(n_in, generator=g) % qw.scale.shape[1]
    lin = SalientLinear.from_quantized(qw, torch.randn(out, generator=g), "none", 4).eval()
    return lin, torch.randn(3, 7, n_in, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group,sym", [(-1, True), (-1, False), (32, True), (64, False)])
def test_packed_product_equals_the_dequantized_layer(bits, group, sym):
    lin, x = layer(bits, group, sym)
    x = x.bfloat16()
    with torch.no_grad():
        got = lin(x)
    assert lin.base.packed(torch.bfloat16).kind == ("int8" if group == -1 else "int4_cpu")  # the kernel ran
    assert got.dtype == torch.bfloat16
    base = lin.base
    scale = base.scale.bfloat16().float()  # what the kernel holds: bf16 scales (and, in groups, zero terms)
    if group == -1:
        w = scale * (base.codes.float() - base.zero)
    else:  # torch's int4 convention: (q - 8) * scale + zero, zero = (8 - z) * scale
        zero = ((8 - base.zero) * base.scale).bfloat16().float()
        w = expand_groups(scale, group, 128) * (base.codes.float() - 8) + expand_groups(zero, group, 128)
    ref = x.float() @ w.T + x[..., lin.salient_idx].float() @ lin.salient_weight.bfloat16().float().T + lin.bias
    torch.testing.assert_close(got.float(), ref, atol=0.05, rtol=1e-2)


@pytest.mark.parametrize("case", ["g_idx", "partial group", "odd outputs", "float32"])
def test_what_no_kernel_takes_falls_back_to_the_same_numbers(case, caplog):
    kw = {"g_idx": dict(g_idx=True), "partial group": dict(n_in=100), "odd outputs": dict(out=40),
          "float32": {}}[case]
    lin, x = layer(3, 32, True, **kw)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    kernels._said.clear()
    with torch.no_grad(), caplog.at_level("INFO", logger="gift_quant.kernels"):
        got, again = lin(x.to(dtype)), lin(x.to(dtype))
    assert lin.base.packed(dtype) is None and caplog.text.count("dequantize their weight") == 1  # said once
    torch.testing.assert_close(got, again)
    ref = x.to(dtype) @ lin.base.weight(dtype).T + x[..., lin.salient_idx].to(dtype) @ lin.salient_weight.to(dtype).T
    torch.testing.assert_close(got, ref + lin.bias.to(dtype), atol=1e-5, rtol=1e-5)


def test_training_keeps_the_dequantizing_path():
    lin, x = layer(3, -1, True)
    x = x.bfloat16()
    lin.train()  # training builds the dequantized weight (and its gradient) as before
    x.requires_grad_(True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.salient_weight.grad is not None


@pytest.mark.parametrize("group", [-1, 32])
def test_a_whole_model_through_the_kernels_gives_the_merged_models_logits(group):
    model = tiny_llama(hidden=64, inter=128).bfloat16()
    results = rtn_with_columns(model, Grid(3, group), lambda _i, m: torch.tensor([1, 9, 33]))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    wrap_quantized(model, results, "none", 4)
    with torch.no_grad():
        packed = model.eval()(ids).logits.float()
        assert all(lin.base.packed(torch.bfloat16) is not None for lin in salient_layers(model).values())
        merge_to_dense(model)  # the same weights in bf16 linears
        dense = model(ids).logits.float()
    torch.testing.assert_close(packed, dense, atol=0.05, rtol=0.02)  # bf16 sums in another order, two blocks
    assert (packed.argmax(-1) == dense.argmax(-1)).float().mean() > 0.95
