"""The GIFT-SW layer: eval equals the dense mixed weight, noise statistics, gradients, memory."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gift_quant.grid import Grid, row_params, rtn
from gift_quant.layers import SalientLinear, merge_to_dense, wrap_quantized


def make_layer(noise="gaussian", group_size=-1, bias=True, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(48, 80)
    idx = torch.tensor([5, 17, 60])
    qw = rtn(w, Grid(3, group_size), idx)
    b = torch.randn(48) if bias else None
    return SalientLinear.from_quantized(qw, b, noise, noise_bits=4), qw, w, b


@pytest.mark.parametrize("group_size", [-1, 16])
def test_eval_output_equals_dense_mixed_weight(group_size):
    layer, qw, w, b = make_layer(group_size=group_size)
    layer.eval()
    x = torch.randn(3, 7, 80)
    w_eff = qw.effective_weight()  # independent of the layer: the QuantizedWeight's own dequantization
    torch.testing.assert_close(layer(x), F.linear(x, w_eff, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.effective_weight(), w_eff)
    assert torch.equal(w_eff[:, qw.salient_idx], w[:, qw.salient_idx])


def injected_noise(layer, n=400):
    """Noise of n training forwards, recovered through the layer's output on the identity input."""
    layer.train()
    eye = torch.eye(80)
    with torch.no_grad():
        clean = layer.eval()(eye)
        layer.train()
        return torch.stack([(layer(eye) - clean).T for _ in range(n)])  # (n, out, in)


def test_gaussian_noise_std_is_half_step_per_row_and_spares_salient_columns():
    layer, qw, _, _ = make_layer("gaussian")
    noise = injected_noise(layer)
    # expected Delta: 4-bit symmetric grid (clipping search) on the non-salient dequantized weights
    mask = torch.ones(80, dtype=torch.bool)
    mask[qw.salient_idx] = False
    delta, _ = row_params(qw.dequantize_grid() * mask, Grid(4, clip_min=0.2, clip_steps=81), mask)
    std = noise[:, :, mask].std(dim=(0, 2))
    torch.testing.assert_close(std, delta.squeeze(1) / 2, rtol=0.05, atol=0)
    assert (noise[:, :, qw.salient_idx] == 0).all()


def test_uniform_noise_std_is_step_over_sqrt12():
    layer, _, _, _ = make_layer("uniform")
    noise = injected_noise(layer, 200)
    mask = layer.noise_mask()
    std = noise[:, :, mask].std(dim=(0, 2))
    torch.testing.assert_close(std, layer.noise_step.squeeze(1) / math.sqrt(12), rtol=0.05, atol=0)
    assert noise.abs().max() <= layer.noise_step.max() / 2 + 1e-6


def test_no_noise_in_eval_and_fresh_noise_each_training_forward():
    layer, _, _, _ = make_layer()
    x = torch.randn(4, 80)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_gradients_reach_only_salient_columns_and_match_dense_reference():
    layer, qw, _, b = make_layer("none")
    layer.train()
    x = torch.randn(5, 80, requires_grad=True)
    layer(x).pow(2).sum().backward()
    # reference: dense mixed weight with autograd on the full weight, then keep the salient columns
    w = qw.effective_weight().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w, b).pow(2).sum().backward()
    torch.testing.assert_close(layer.salient_weight.grad, w.grad[:, qw.salient_idx], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["salient_weight"]


def test_backward_redraws_the_forward_noise():
    layer, _, _, _ = make_layer("gaussian", bias=False)
    layer.train()
    x = torch.randn(5, 80, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    y.backward(torch.ones_like(y))
    torch.manual_seed(3)  # the same seed draw gives the same noise: read the noisy weight off the output
    with torch.no_grad():
        w_noisy = layer(torch.eye(80)).T
    assert not torch.allclose(w_noisy, layer.effective_weight())  # the noise is there
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ w_noisy, atol=1e-4, rtol=1e-4)


def test_layer_holds_no_dense_float_copy():
    layer, _, _, _ = make_layer()
    n = 48 * 80
    float_bytes = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers())
                      if t.is_floating_point())
    assert float_bytes < 0.1 * n * 4  # scales, salient columns, bias, noise step: far below a dense copy
    assert layer.base.codes.dtype == torch.uint8 and layer.base.codes.numel() == n


def test_wrap_and_merge_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 48), nn.ReLU(), nn.Linear(48, 16))
    results = {"0": rtn(model[0].weight, Grid(3), torch.tensor([1, 2])),
               "2": rtn(model[2].weight, Grid(4, 16), torch.tensor([0]))}
    x = torch.randn(6, 80)
    expected = F.linear(torch.relu(F.linear(x, results["0"].effective_weight(), model[0].bias)),
                        results["2"].effective_weight(), model[2].bias)
    wrap_quantized(model, results, "gaussian", 4)
    assert isinstance(model[0], SalientLinear) and not any(
        p.requires_grad for n, p in model.named_parameters() if "salient" not in n)
    model.eval()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    merge_to_dense(model)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group,g_idx,n_in,autocast", [(-1, False, 96, False), (32, False, 96, False),
                                                       (32, False, 80, False), (32, True, 96, False),
                                                       (32, False, 96, True)])
def test_learned_scales_get_the_gradient_of_scale_times_codes_minus_zero(group, g_idx, n_in, autocast):
    """The frozen product's scale gradient (built from grad_out^T x in backward) equals autograd's through
    ``W = scale * (codes - zero)`` written out plainly; the input's gradient is unchanged by it. ``autocast``: the
    backward runs under bfloat16 autocast (as the train step's did), where the float32 product of the weight's
    gradient became bfloat16 and the scales' float32 sum refused it."""
    from gift_quant.grid import expand_groups
    from gift_quant.layers import SalientLinear

    g = torch.Generator().manual_seed(3)
    qw = rtn(torch.randn(40, n_in, generator=g), Grid(3, group), torch.tensor([2, 50, 77]))
    if g_idx:
        qw.g_idx = torch.randperm(n_in, generator=g) % qw.scale.shape[1]
    layer = SalientLinear.from_quantized(qw, torch.randn(40, generator=g), "none", 4).train()
    layer.base.learn_scales()
    x = torch.randn(3, 5, n_in, generator=g, requires_grad=True)
    r = torch.randn(3, 5, 40, generator=g)
    y = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (y * r).sum().backward()

    scale = qw.scale.clone().requires_grad_(True)
    dq = qw.codes.float() - expand_groups(qw.zero, group, n_in, qw.g_idx)
    w = expand_groups(scale, group, n_in, qw.g_idx) * dq
    w = torch.cat([w[:, :2], layer.salient_weight[:, :1].detach(), w[:, 3:50], layer.salient_weight[:, 1:2].detach(),
                   w[:, 51:77], layer.salient_weight[:, 2:3].detach(), w[:, 78:]], 1)
    x2 = x.detach().clone().requires_grad_(True)
    ((x2 @ w.T + layer.bias) * r).sum().backward()
    torch.testing.assert_close(layer.base.scale.grad, scale.grad, atol=1e-4, rtol=1e-4)
    tol = 2e-2 if autocast else 1e-5  # autocast runs the salient columns' backward product in bfloat16
    torch.testing.assert_close(x.grad, x2.grad, atol=tol, rtol=tol)


def test_a_layer_names_what_trains_and_writes_it_back_to_its_grid():
    """``param_groups``: the columns always, the scales once learned; ``write_to``: a grid rebuilt from what the layer
    wrote back gives a layer of the same weight (the trained columns and scales, the codes untouched)."""
    from dataclasses import replace

    from gift_quant.layers import learn_scales, param_groups

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    qw = rtn(w, Grid(3, 8), torch.tensor([2, 9, 31]))
    model = nn.Sequential(nn.Linear(40, 24, bias=False))
    wrap_quantized(model, {"0": replace(qw)}, "none", 4)
    layer = model[0]
    assert param_groups(model) == {"columns": [layer.salient_weight], "scales": [], "zeros": [], "weights": []}
    learn_scales(model)
    groups = param_groups(model)
    assert groups["columns"][0] is layer.salient_weight and groups["scales"][0] is layer.base.scale
    with torch.no_grad():
        layer.salient_weight.add_(0.5)
        layer.base.scale.mul_(1.25)
    back = replace(qw)
    layer.write_to(back)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.salient_idx, qw.salient_idx)
    assert torch.equal(back.scale, qw.scale * 1.25) and torch.equal(back.salient_weight, qw.salient_weight + 0.5)
    rebuilt = SalientLinear.from_quantized(back, None, "none", 4)
    assert torch.equal(rebuilt.effective_weight(), layer.effective_weight())


@pytest.mark.parametrize("sym", [True, False])
def test_a_layer_that_trains_every_weight_freezes_to_the_codes_it_computed_with(sym):
    """``learn_weights`` from the full-precision weight: the latent weight, scales and (asymmetric grid only) zero
    points train; the salient columns add nothing to the base; ``write_to`` freezes the latent weight to codes that
    give the very weight the layer computed with (salient columns' codes kept), and a layer rebuilt from the grid
    computes the same."""
    from dataclasses import replace

    from gift_quant.layers import learn_weights, param_groups

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    salient = torch.tensor([2, 9, 31])
    qw = rtn(w, Grid(3, 8, sym=sym), salient)
    model = nn.Sequential(nn.Linear(40, 24, bias=False))
    wrap_quantized(model, {"0": replace(qw)}, "none", 4)
    layer = model[0]
    learn_weights(model, {"0": w + 0.1})
    groups, base = param_groups(model), layer.base
    assert groups["weights"] == [base.latent] and groups["scales"] == [base.scale]
    assert groups["zeros"] == ([] if sym else [base.zero])
    torch.testing.assert_close(base.latent[:, 3], w[:, 3] + 0.1)
    assert not base.latent[:, salient].any()
    with torch.no_grad():
        base.scale.mul_(1.1)
        base.zero.add_(0 if sym else 0.4)
    model(torch.randn(2, 40)).sum().backward()
    assert base.latent.grad[:, 3].abs().sum() > 0 and not base.latent.grad[:, salient].any()
    want = layer.effective_weight().detach()
    back = replace(qw)
    layer.write_to(back)
    assert not layer.trains_weights and int(back.codes.max()) <= 7
    assert torch.equal(back.codes[:, salient], qw.codes[:, salient]) and torch.equal(back.zero, back.zero.round())
    assert not torch.equal(back.codes, qw.codes)
    torch.testing.assert_close(back.effective_weight(), want)
    torch.testing.assert_close(SalientLinear.from_quantized(back, None, "none", 4).effective_weight(), want)


def test_merging_releases_each_layer_as_its_linear_takes_its_place(monkeypatch):
    """``merge_to_dense`` holds one GIFT-SW layer at a time: while a layer's dense weight is built, every layer
    merged before it is gone (the peak is the model plus one layer, not the model twice)."""
    import gc
    import weakref

    from gift_quant.layers import salient_layers

    model = nn.Sequential(*(nn.Linear(32, 32, bias=False) for _ in range(4)))
    results = {str(i): rtn(m.weight.detach(), Grid(3), torch.tensor([1, 7])) for i, m in enumerate(model)}
    wrap_quantized(model, results, "none", 4)
    refs = [weakref.ref(m) for m in salient_layers(model).values()]
    alive = []
    effective = SalientLinear.effective_weight

    def count(self):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return effective(self)

    monkeypatch.setattr(SalientLinear, "effective_weight", count)
    merge_to_dense(model)
    assert alive == [4, 3, 2, 1] and all(isinstance(m, nn.Linear) for m in model)
