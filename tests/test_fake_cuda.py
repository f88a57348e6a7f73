"""The device paths of a GPU run, on a CPU-only machine (marker ``fake_cuda``, part of the normal suite).

Two stand-ins for a GPU, each with its limits (torch 2.13 CPU build):

* ``FakeTensorMode`` makes ``cuda`` tensors and raises ``FakeTensorDeviceMismatchError`` when an op mixes
  devices, so ``device.type == "cuda"`` branches run. It has no values (no ``.item()``, no
  ``torch.equal``, no Cholesky ``info`` check), no CUDA generator, and advanced indexing with a cuda index
  (``w[:, idx]``) raises "not linked with support for cuda devices"; a backward pass aborts the process.
* the ``meta`` device raises on any mix with a CPU tensor and runs indexing and autograd, but has no
  values and no generator of its own.

What neither can run is replaced around the code under test, and named where it is: the noise
generator (a CPU generator drives ``randn`` on the stand-in device), ``torch.equal`` in ``from_gptq``,
the Cholesky factor of GPTQ.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from gift_quant import gptq as gptq_mod
from gift_quant import noise as noise_mod
from gift_quant import pack as pack_mod
from gift_quant.calibrate import BlockInputs, InputStats
from gift_quant.grid import Grid, grid_params, rtn
from gift_quant.layers import SalientLinear, merge_to_dense, salient_layers, wrap_full_precision, wrap_quantized
from gift_quant.noise import draw, noise_step
from gift_quant.quantize import quantize_linear, rtn_with_columns, select_salient
from gift_quant.recipe import QuantSpec, SaliencySpec

from .conftest import tiny_llama

pytestmark = pytest.mark.fake_cuda

META = torch.device("meta")


@pytest.fixture
def seeded_anywhere(monkeypatch):
    """Seeded noise on a stand-in device: neither has a generator of its own, so a CPU generator drives it."""
    monkeypatch.setattr(noise_mod, "generator", lambda _device, seed: torch.Generator().manual_seed(seed))


def fake_cuda() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=False)


def on_meta(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every tensor on the meta device (``to_empty`` keeps nothing on the CPU)."""
    return module.to_empty(device=META)


def quantized_layer(group_size: int = -1, noise: str = "gaussian", k: int = 3) -> SalientLinear:
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    qw = rtn(w, Grid(3, group_size), torch.arange(k) * 7)
    return SalientLinear.from_quantized(qw, torch.zeros(48), noise, 4)


# ----------------------------------------------------------------------------- the quantization path


def test_select_salient_with_k_zero_stays_on_the_device():
    """k = 0 (plain GPTQ / RTN: the LoRA stage and evaluate's baselines) returned a CPU index."""
    with fake_cuda():
        w = torch.randn(16, 32, device="cuda")
        idx = select_salient(w, None, SaliencySpec(k=0), QuantSpec(bits=3), "q_proj")
    assert idx.device.type == "cuda" and idx.numel() == 0


@pytest.mark.parametrize("group_size", [-1, 16])
def test_plain_rtn_on_meta(group_size):
    """RTN with k = 0 and the clipping search (its chunks are written in place, which fake cuda cannot run)."""
    w = torch.randn(16, 32, device=META)
    quant = QuantSpec(bits=3, method="rtn", group_size=group_size, clip_min=0.5, clip_steps=6)
    qw = quantize_linear(w, None, SaliencySpec(k=0), quant, "q_proj")
    assert {t.device for t in (qw.codes, qw.scale, qw.zero, qw.salient_idx, qw.salient_weight)} == {META}


@pytest.mark.parametrize("group_size", [-1, 16])
def test_clipping_search_on_fake_cuda(group_size):
    """The sorted clipping search (sort, binary searches, prefix sums, the tie rule) stays on the weight's device."""
    with fake_cuda():
        w = torch.randn(16, 64, device="cuda")
        mask = torch.ones(64, dtype=torch.bool, device="cuda")
        scale, zero = grid_params(w, Grid(3, group_size, sym=False, clip_min=0.2, clip_steps=81), mask)
        assert scale.device.type == zero.device.type == "cuda"
        assert scale.shape == zero.shape == (16, 1 if group_size == -1 else 4)


@pytest.mark.parametrize("act_order", [False, True])
def test_plain_gptq_on_meta(monkeypatch, act_order):
    """GPTQ with k = 0, per row (its in-place updates of column views need meta: fake cuda cannot write into a
    view). Stood in for: the Cholesky factor (its ``info`` check needs a value); not run: groups, whose
    column-to-group list GPTQ reads on the host once per layer (``tolist``)."""
    monkeypatch.setattr(gptq_mod, "inverse_cholesky", lambda h, _original=None: torch.eye(h.shape[0], device=h.device))
    w = torch.randn(16, 32, device=META)
    stats = InputStats(32, META)
    stats.update(torch.randn(64, 32, device=META))
    quant = QuantSpec(bits=3, group_size=-1, act_order=act_order)
    qw = quantize_linear(w, stats, SaliencySpec(k=0), quant, "q_proj")
    assert {t.device for t in (qw.codes, qw.scale, qw.salient_idx, qw.salient_weight)} == {META}


def test_noise_step_without_noise_is_on_the_weights_device():
    """``noise: none`` gave CPU zeros; noise drawn later from them would be on the CPU beside cuda weights."""
    with fake_cuda():
        w = torch.randn(16, 32, device="cuda")
        mask = torch.ones(32, dtype=torch.bool, device="cuda")
        assert noise_step(w, mask, 4, "none").device.type == "cuda"
    w, mask = torch.randn(16, 32, device=META), torch.ones(32, dtype=torch.bool, device=META)
    assert noise_step(w, mask, 4, "gaussian").device == META  # the grid search: on meta (in-place chunks)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_draw_on_the_device(seeded_anywhere, kind):
    with fake_cuda():
        step = torch.rand(16, 1, device="cuda")
        mask = torch.ones(32, dtype=torch.bool, device="cuda")
        out = draw(kind, step, mask, torch.Size((16, 32)), 3, torch.bfloat16)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16


_VIEWS = ("view", "slice", "_unsafe_view", "expand", "t", "alias", "detach")


class _Ops(TorchDispatchMode):
    """Every op run inside it (``names``) and the element counts of the tensors the ops created (``numels``:
    in-place ops and views create none)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(func.__name__)
        inplace = func._schema.name.endswith("_") or any(a.is_write for a in func._schema.arguments if a.alias_info)
        if isinstance(out, torch.Tensor) and not inplace and func.__name__.split(".")[0] not in _VIEWS:
            self.numels.append(out.numel())
        return out

    def count(self, n: int) -> int:
        """How many created tensors have at least ``n`` elements."""
        return sum(1 for m in self.numels if m >= n)


def test_spilled_block_inputs_are_copied_once_into_pinned_memory(monkeypatch):
    """Spilling went through a pageable copy and then ``pin_memory()``, a second copy of every batch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with fake_cuda():
        h = torch.randn(2, 8, 16, device="cuda")
        with _Ops() as ops:
            kept = BlockInputs(torch.device("cuda"), resident=False).keep(h)
    copies = [n for n in ops.names if n.split(".")[0] in ("_to_copy", "copy_", "_pin_memory", "clone")]
    assert kept.device.type == "cpu" and len(copies) == 1, ops.names


# ----------------------------------------------------------------------------- packing and loading


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_and_unpack_on_the_device(bits):
    """On meta: packing writes into word views, which fake cuda cannot."""
    codes = torch.zeros(50, 7, dtype=torch.int64, device=META)
    packed = pack_mod.pack_rows(codes, bits)
    back = pack_mod.unpack_rows(packed, bits, 50)
    g_idx = pack_mod.static_g_idx(50, 16, 4, META)
    assert packed.device == back.device == g_idx.device == META


@pytest.mark.parametrize("act_order", [False, True])
def test_from_gptq_on_the_device(monkeypatch, act_order):
    """``from_gptq`` where the loader put the tensors (``device_map="cuda"``); ``torch.equal`` (is ``g_idx`` the
    static one?) needs values, so the test answers it for each case."""
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    plain = rtn(w, Grid(3, 16), torch.zeros(0, dtype=torch.long))
    tensors = {k: v.to(META) for k, v in pack_mod.to_gptq(plain).items()}
    monkeypatch.setattr(pack_mod.torch, "equal", lambda a, b: a.device == b.device and not act_order)
    qw = pack_mod.from_gptq(tensors, 3, 16, 64, 40)
    assert (qw.g_idx is not None) == act_order
    assert {t.device for t in (qw.codes, qw.scale, qw.zero, qw.salient_idx, qw.salient_weight)} == {META}


@pytest.mark.parametrize("noise", ["none", "gaussian"])
def test_gift_layer_built_on_the_device(noise):
    """The last step of both gift loaders (``salient_linear_from_packed``: ``from_gptq``, then
    ``SalientLinear.from_quantized``) where ``device_map`` put the tensors. The loaders' own checks treat a
    meta tensor as one not loaded yet, and fake cuda cannot unpack, so the test starts from ``from_gptq``'s
    result on meta (``test_from_gptq_on_the_device`` covers that step)."""
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    qw = rtn(w, Grid(3, 16), torch.tensor([3, 9, 50])).to(META)
    layer = SalientLinear.from_quantized(qw, torch.zeros(40, device=META), noise, 4)
    assert {t.device for t in layer.state_dict().values()} == {META}


# ----------------------------------------------------------------------------- the GIFT-SW layer


@pytest.mark.parametrize("group_size", [-1, 16, 24])  # 24: a last partial group of 80 inputs
@pytest.mark.parametrize("noise", ["gaussian", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_salient_linear_forward_backward_on_meta(seeded_anywhere, group_size, noise, dtype):
    layer = on_meta(quantized_layer(group_size, noise)).train()
    x = torch.randn(2, 5, 80, device=META, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.device == META and y.dtype == dtype and x.grad.dtype == dtype
    assert layer.salient_weight.grad.shape == (48, 3) and layer.salient_weight.grad.device == META


@pytest.mark.parametrize("group_size", [-1, 16])
def test_inference_on_the_device_takes_the_dequantizing_path_where_no_kernel_runs(group_size):
    """Eval mode tries torch's packed int8 / int4 kernels (``kernels``); on meta (no values to pack) the
    dequantizing path runs, on the device. The CUDA kernels themselves run only in the GPU check."""
    layer = on_meta(quantized_layer(group_size, "none")).eval()
    with torch.no_grad():
        y = layer(torch.randn(2, 5, 80, device=META))
    assert y.device == META and y.shape == (2, 5, 48) and layer.base.packed(torch.float32) is None


class _Recorder:
    """The dtypes ``base_weight`` was built in, and the weights themselves."""

    def __init__(self, layer: SalientLinear):
        self.calls: list[tuple[torch.dtype, torch.Tensor]] = []
        real = layer.base_weight

        def spy(dtype, seed):
            w = real(dtype, seed)
            self.calls.append((dtype, w.clone()))
            return w

        layer.base_weight = spy


def test_float32_model_under_bf16_autocast_builds_one_weight_for_both_passes():
    """The frozen weight and its noise were built in float32 in forward and again in bf16 in backward: twice
    the memory, and not the same noisy weight. Run on the CPU's bf16 autocast (the same code as cuda's)."""
    layer = quantized_layer(16, "gaussian").train()
    rec = _Recorder(layer)
    x = torch.randn(2, 5, 80, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y.float().sum().backward()
    (d_fwd, w_fwd), (d_bwd, w_bwd) = rec.calls
    assert d_fwd == d_bwd == torch.bfloat16
    assert torch.equal(w_fwd, w_bwd)
    assert x.grad.dtype == torch.float32
    # the gradient is that of the very weight the forward used: grad_x = grad_y @ (W + noise) + salient part
    g = torch.ones(2, 5, 48, dtype=torch.bfloat16) @ w_fwd
    g[..., layer.salient_idx] += torch.ones(2, 5, 48, dtype=torch.bfloat16) @ layer.salient_weight.bfloat16()
    torch.testing.assert_close(x.grad, g.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_dequantize_allocates_one_weight_sized_tensor(group_size):
    """``QuantBase.weight`` expanded scale and zero to (out, in) and then cast them: two extra weight-sized
    tensors in every forward, recompute and backward. The values stay those of the plain formula."""
    layer = quantized_layer(group_size, "none")
    base = layer.base
    n = base.codes.numel()
    with _Ops() as sizes:
        w = base.weight(torch.bfloat16)
    assert sizes.count(n) == 1, sizes.numels
    s = base.scale.repeat_interleave(group_size if group_size > 0 else 80, 1)[:, :80].bfloat16()
    z = base.zero.repeat_interleave(group_size if group_size > 0 else 80, 1)[:, :80].bfloat16()
    assert torch.equal(w, s * (base.codes.bfloat16() - z))


def test_noise_adds_one_weight_sized_tensor(seeded_anywhere):
    layer = quantized_layer(16, "gaussian")
    n = layer.base.codes.numel()
    with _Ops() as sizes:
        layer.base_weight(torch.float32, 5)
    assert sizes.count(n) == 2, sizes.numels  # the dequantized weight and the noise it is added into


# ----------------------------------------------------------------------------- model plumbing


def test_wrap_full_precision_keeps_one_copy_on_the_device():
    """``lin.to(device)`` then a clone kept two dense copies of every layer on the device until the whole model
    was wrapped (the moved originals stay referenced): 26 GB too many for a 7B model in bf16."""
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("proj")}
    salient = {n: torch.tensor([1, 5]) for n in originals}
    wrap_full_precision(model, salient, "none", 4, META)
    assert all(m.weight.device.type == "cpu" for m in originals.values())  # the originals did not move
    layers = salient_layers(model)
    assert all(lin.base.dense.device == META and lin.salient_idx.device == META for lin in layers.values())


def test_wrap_quantized_and_merge_on_meta():
    model = tiny_llama()
    results = rtn_with_columns(model, Grid(3, 16), lambda _i, _m: torch.tensor([0, 7]))
    wrap_quantized(model, results, "none", 4, META)
    assert {t.device for lin in salient_layers(model).values() for t in lin.state_dict().values()} == {META}
    merge_to_dense(model)
    merged = [m for n, m in model.named_modules() if n.endswith("proj")]
    assert merged and all(type(m) is nn.Linear and m.weight.device == META for m in merged)


@pytest.fixture
def unpacked_rows(monkeypatch):
    """transformers asks the position ids whether rows pack several sequences (a value meta cannot give): none."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda _position_ids: None)


def test_a_training_step_of_a_tiny_model_on_meta(seeded_anywhere, unpacked_rows):
    """Forward, backward and an AdamW step of a tiny GIFT-SW model held on the meta device: any CPU tensor
    made on the way (noise, masks, indices, the optimizer's state) raises. ``train`` itself reads the loss
    with ``.item()``, which meta cannot answer; its device handling is what this step runs."""
    model = tiny_llama()
    results = rtn_with_columns(model, Grid(3, -1), lambda _i, _m: torch.tensor([0, 7]))
    wrap_quantized(model, results, "gaussian", 4)
    model = model.to_empty(device=META).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.device == META for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.zeros(2, 16, dtype=torch.long, device=META)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    assert all(p.grad is not None and p.grad.device == META for p in params)


def test_lora_baseline_model_on_meta(unpacked_rows):
    """The LoRA stage's model: PEFT LoRA on the plain quantized dense weights, on the run's device."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama().to_empty(device=META)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ids = torch.zeros(1, 8, dtype=torch.long, device=META)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad.device == META for p in model.parameters() if p.requires_grad)


def test_train_times_a_step_after_the_device_finished(monkeypatch, tmp_path):
    """A step's time was read while the optimizer's kernels were still queued on the GPU."""
    from gift_quant import devices
    from gift_quant.recipe import TrainSpec
    from gift_quant.train import train

    calls = []
    monkeypatch.setattr(devices, "synchronize", lambda d: calls.append(d))
    model = tiny_llama()
    wrap_quantized(model, rtn_with_columns(model, Grid(3), lambda _i, _m: torch.tensor([1])), "none", 4)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    train(model, ids, ids.clone(), TrainSpec(steps=3, micro_batch_size=2, seq_len=16, checkpoint_every=100,
                                             noise="none"), tmp_path, device=torch.device("cpu"))
    assert len(calls) == 3


def test_a_per_row_grid_on_a_gpu_keeps_the_dequantizing_path():
    """On CUDA torch's int8 weight kernel is a dot product per output, far slower than dequantizing for cuBLAS: a
    per-row grid there is not packed (said before any value is read); on the CPU the same grid takes the int8
    kernel."""
    from gift_quant import kernels

    def why(device: str) -> str | None:
        codes = torch.randint(0, 8, (64, 128), dtype=torch.uint8, device=device)
        return kernels._unsupported(codes, torch.full((64, 1), 4.0, device=device), -1, None, torch.bfloat16)

    with fake_cuda():
        assert "per-row grids on cuda" in why("cuda")
    assert why("cpu") is None
