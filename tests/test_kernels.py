"""Packed integer matmuls of the frozen grid against the dequantized reference (``effective_weight``)."""
import pytest
import torch

from gift_quant import kernels
from gift_quant.grid import Grid, rtn
from gift_quant.layers import SalientLinear, merge_to_dense, wrap_quantized
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
    with torch.no_grad():
        got = lin(x)
        ref = x @ lin.effective_weight().T + lin.bias
    assert lin.base.packed(torch.float32).kind == ("int8" if group == -1 else "int4_cpu")  # the kernel ran
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["g_idx", "partial group", "odd outputs"])
def test_what_no_kernel_takes_falls_back_to_the_same_numbers(case, caplog):
    kw = {"g_idx": dict(g_idx=True), "partial group": dict(n_in=100), "odd outputs": dict(out=40)}[case]
    lin, x = layer(3, 32, True, **kw)
    kernels._said.clear()
    with torch.no_grad(), caplog.at_level("INFO", logger="gift_quant.kernels"):
        got, again = lin(x), lin(x)
    assert lin.base.packed(torch.float32) is None and caplog.text.count("dequantize their weight") == 1  # once
    torch.testing.assert_close(got, again)
    torch.testing.assert_close(got, x @ lin.effective_weight().T + lin.bias, atol=1e-5, rtol=1e-5)


def test_bf16_activations_and_training_keep_their_paths():
    lin, x = layer(3, -1, True)
    with torch.no_grad():
        got = lin(x.bfloat16())
    assert got.dtype == torch.bfloat16 and lin.base.packed(torch.bfloat16) is not None
    ref = x @ lin.effective_weight().T + lin.bias
    torch.testing.assert_close(got.float(), ref, atol=0.1, rtol=0.02)  # bf16 rounding of the output
    lin.train()  # training builds the dequantized weight (and its gradient) as before
    x.requires_grad_(True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.salient_weight.grad is not None


@pytest.mark.parametrize("group", [-1, 32])
def test_a_whole_model_through_the_kernels_gives_the_merged_models_logits(group):
    model = tiny_llama(hidden=64, inter=128)
    results = rtn_with_columns(model, Grid(3, group), lambda _i, m: torch.tensor([1, 9, 33]))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    wrap_quantized(model, results, "none", 4)
    with torch.no_grad():
        packed = model.eval()(ids).logits
        merge_to_dense(model)
        dense = model(ids).logits
    torch.testing.assert_close(packed, dense, atol=1e-4, rtol=1e-4)
