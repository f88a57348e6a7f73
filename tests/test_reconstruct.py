"""Block-wise reconstruction: each block's error against full precision falls, the stage's losses are the blocks'
own, the quantized-input chain is the model's, and a kill mid-stage resumes to the uninterrupted result."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from gift_quant import reconstruct
from gift_quant.families import decoder_layers
from gift_quant.quantize import quantize_model
from gift_quant.recipe import QuantSpec, ReconstructSpec, SaliencySpec
from gift_quant.rundir import RunError, piece_checker

from .conftest import tiny_llama

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quantized():
    """A tiny full-precision Llama and its GPTQ W3 layers with 4 salient columns (the quantize stage's result)."""
    fp = tiny_llama(layers=3)
    q = copy.deepcopy(fp)
    layers = quantize_model(q, WINDOWS, SaliencySpec(metric="owq", k=4), QuantSpec(bits=3), batch_size=4)
    return fp, q, layers


def _run(quantized, tmp_path, **spec):
    fp, _, layers = quantized
    model, layers = copy.deepcopy(fp), copy.deepcopy(layers)
    spec = ReconstructSpec(enabled=True, epochs=4, batch_size=4, lr=1e-3, **spec)
    losses = reconstruct.reconstruct_model(model, WINDOWS, layers, spec, tmp_path, "key", seed=0)
    return model, layers, losses


def _block_io(model) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """Each decoder block's input, keyword arguments and output in one forward of ``model`` on the windows."""
    seen = []
    hooks = []
    for block in decoder_layers(model):
        hooks.append(block.register_forward_pre_hook(lambda _m, a, kw: seen.append([a[0], kw]), with_kwargs=True))
        hooks.append(block.register_forward_hook(lambda _m, _a, out: seen[-1].append(
            out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(WINDOWS, use_cache=False)
    for h in hooks:
        h.remove()
    return [tuple(s) for s in seen]


def _mse(block, x, kw, target) -> float:
    with torch.no_grad():
        out = block(x, **kw)
    return float(torch.mean(((out[0] if isinstance(out, tuple) else out) - target) ** 2))


def test_each_blocks_error_against_full_precision_falls_and_the_stage_reports_it(quantized, tmp_path):
    """inputs: fp. Block i of the untrained quantized model and of the reconstructed one, both fed the full-precision
    model's input to block i: the reconstructed block is closer to the full-precision block's output, block by block,
    and the losses the stage records are these errors."""
    fp, untrained, _ = quantized
    model, _, losses = _run(quantized, tmp_path, inputs="fp")
    io = _block_io(fp)
    for i, (x, kw, target) in enumerate(io):
        before = _mse(decoder_layers(untrained)[i], x, kw, target)
        after = _mse(decoder_layers(model)[i], x, kw, target)
        assert after < 0.9 * before, (i, before, after)
        assert losses[i]["before"] == pytest.approx(before, rel=1e-3)
        assert losses[i]["after"] == pytest.approx(after, rel=1e-3)


@pytest.mark.parametrize("init,lr", [("fp", 3e-4), ("quantized", 1e-3)])  # on its codes a weight must move half a step
def test_every_weight_trained_lowers_each_blocks_error_and_freezes_to_codes_that_give_it(quantized, tmp_path, init, lr):
    """train: weights. Each block's recorded losses are its real errors against the full-precision block (before: on
    the quantize stage's codes where the latent weights start from them), training lowers them, and the codes the
    latent weights freeze to (in range; salient indices, bits and the symmetric zero points unchanged) are the model
    the stage leaves: each merged linear's weight is its ``QuantizedWeight``'s."""
    fp, untrained, layers = quantized
    model, trained, losses = _run(quantized, tmp_path, inputs="fp", train="weights", init=init, weights_lr=lr)
    io = _block_io(fp)
    for i, (x, kw, target) in enumerate(io):
        after = _mse(decoder_layers(model)[i], x, kw, target)
        assert losses[i]["after"] == pytest.approx(after, rel=1e-3)
        assert after < 0.9 * losses[i]["before"], (i, losses[i])
        if init == "quantized":
            assert losses[i]["before"] == pytest.approx(_mse(decoder_layers(untrained)[i], x, kw, target), rel=1e-3)
    changed = 0
    for name, qw in trained.items():
        assert int(qw.codes.max()) <= 7 and torch.equal(qw.salient_idx, layers[name].salient_idx)
        assert torch.equal(qw.zero, layers[name].zero) and (qw.scale > 0).all()
        torch.testing.assert_close(model.get_submodule(name).weight, qw.effective_weight())
        changed += int((qw.codes != layers[name].codes).sum())
    assert changed > 0


def test_quantized_inputs_are_the_reconstructed_models_own(quantized, tmp_path):
    """inputs: quantized. Block i trains on what the reconstructed blocks before it give: the loss recorded after
    training equals block i's error on the reconstructed model's own input to it, against the full-precision block's
    output on the full-precision input."""
    fp = quantized[0]
    model, _, losses = _run(quantized, tmp_path, inputs="quantized")
    ours, theirs = _block_io(model), _block_io(fp)
    for i, ((x, kw, _), (_, _, target)) in enumerate(zip(ours, theirs)):
        assert losses[i]["after"] == pytest.approx(_mse(decoder_layers(model)[i], x, kw, target), rel=1e-3)
        assert losses[i]["after"] < losses[i]["before"]
    assert not torch.allclose(ours[1][0], theirs[1][0])  # block 1 did see quantized inputs


def test_learned_scales_move_the_scales_and_keep_the_codes(quantized, tmp_path):
    _, _, layers = quantized
    _, trained, _ = _run(quantized, tmp_path, learn_scales=True, scales_lr=1e-3)
    for name, qw in layers.items():
        assert torch.equal(trained[name].codes, qw.codes) and torch.equal(trained[name].salient_idx, qw.salient_idx)
        assert not torch.equal(trained[name].salient_weight, qw.salient_weight)
        assert not torch.equal(trained[name].scale, qw.scale) and (trained[name].scale > 0).all()
    _, frozen, _ = _run(quantized, tmp_path / "frozen")
    assert all(torch.equal(frozen[n].scale, qw.scale) for n, qw in layers.items())


def test_a_blocks_replaced_linears_are_freed_before_the_next_block(quantized, tmp_path, monkeypatch):
    """Each block's linears are replaced by GIFT-SW layers and, once trained, merged into new dense ones: the
    replaced modules (with their weights, on the device where the block trains) must not outlive their block, or
    every block's weights pile up there (a map of every module to its name held them until the stage ended)."""
    import gc
    import weakref

    fp, _, layers = quantized
    model = copy.deepcopy(fp)
    first = [weakref.ref(m) for m in decoder_layers(model)[0].modules() if isinstance(m, torch.nn.Linear)]
    alive = []
    real = reconstruct.train_block

    def train_block(block, *a, **k):
        gc.collect()
        alive.append(sum(r() is not None for r in first))
        return real(block, *a, **k)

    monkeypatch.setattr(reconstruct, "train_block", train_block)
    spec = ReconstructSpec(enabled=True, epochs=1, batch_size=4)
    reconstruct.reconstruct_model(model, WINDOWS, copy.deepcopy(layers), spec, tmp_path, "key", seed=0)
    assert len(first) == 7 and alive == [0, 0, 0]


@pytest.mark.parametrize("spec", [{"noise": "gaussian", "learn_scales": True, "inputs": "quantized"},
                                  {"noise": "gaussian", "train": "weights", "init": "fp", "inputs": "quantized",
                                   "norms": True, "norms_lr": 1e-2}],
                         ids=["columns", "weights and norms"])
def test_a_kill_mid_stage_redoes_one_block_and_gives_the_uninterrupted_result(quantized, tmp_path, monkeypatch, spec):
    """Noise and learned scales (or every weight) on (the seeded parts): killed while block 1 trains, the rerun trains
    blocks 1 and 2 only and ends with the uninterrupted run's tensors, bit for bit."""
    whole_model, whole, whole_losses = _run(quantized, tmp_path / "whole", **spec)
    trained = []
    real = reconstruct.train_block

    def killed_at_block_1(block, *a, **k):
        if len(trained) == 1:
            raise KeyboardInterrupt
        trained.append(1)
        return real(block, *a, **k)

    monkeypatch.setattr(reconstruct, "train_block", killed_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        _run(quantized, tmp_path / "killed", **spec)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["block-000.safetensors"]
    calls = []
    monkeypatch.setattr(reconstruct, "train_block", lambda *a, **k: (calls.append(1), real(*a, **k)))
    model, resumed, losses = _run(quantized, tmp_path / "killed", **spec)
    assert len(calls) == 2 and losses == whole_losses
    for name, qw in whole.items():
        for field in ("salient_weight", "scale", "codes", "zero"):
            assert torch.equal(getattr(resumed[name], field), getattr(qw, field)), field
    norms, whole_norms = reconstruct.block_norms(model), reconstruct.block_norms(whole_model)
    assert all(torch.equal(norms[n], w) for n, w in whole_norms.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_norms_are_the_models_and_a_bfloat16_norm_takes_small_steps(quantized, tmp_path, dtype):
    """reconstruct.norms: every block's norms move and keep their dtype; the losses the stage records are the errors
    of the blocks with their trained norms; ``load_norms`` of ``block_norms`` puts them into a fresh model. In bfloat16
    a step of lr 1e-3 is below half a bfloat16 step near 1 (2**-8): the float32 copy that trains still moves them."""
    fp, _, layers = quantized
    start = copy.deepcopy(fp).to(dtype)
    model = copy.deepcopy(start)
    spec = ReconstructSpec(enabled=True, epochs=4, batch_size=4, lr=1e-3, inputs="fp", norms=True, norms_lr=1e-3)
    losses = reconstruct.reconstruct_model(model, WINDOWS, copy.deepcopy(layers), spec, tmp_path, "key", seed=0)
    norms, before = reconstruct.block_norms(model), reconstruct.block_norms(start)
    assert len(norms) == 6 and all(w.dtype == dtype and not torch.equal(w, before[n]) for n, w in norms.items())
    if dtype == torch.float32:
        for i, (x, kw, target) in enumerate(_block_io(fp)):
            assert losses[i]["after"] == pytest.approx(_mse(decoder_layers(model)[i], x, kw, target), rel=1e-3)
    save_file(norms, tmp_path / "norms.safetensors")
    reconstruct.load_norms(start, tmp_path / "norms.safetensors")
    assert all(torch.equal(w, start.get_parameter(n)) for n, w in norms.items())


def test_a_work_folder_of_another_recipe_is_refused(quantized, tmp_path):
    fp, _, layers = quantized
    spec = ReconstructSpec(enabled=True, epochs=1)
    reconstruct.reconstruct_model(copy.deepcopy(fp), WINDOWS, copy.deepcopy(layers), spec, tmp_path, "one", seed=0)
    with pytest.raises(RunError, match="written from a different recipe .the reconstruct section.*--from reconstruct"):
        piece_checker("reconstruct")(tmp_path, "other")
    with pytest.raises(RunError, match="block-000.safetensors was written from a different recipe"):
        reconstruct.reconstruct_model(copy.deepcopy(fp), WINDOWS, copy.deepcopy(layers), spec, tmp_path, "other", 0)


def test_a_damaged_finished_block_is_named_and_redone(quantized, tmp_path, caplog):
    """A truncated ``block-001.safetensors`` (a disk that filled, a copy cut short): the stage's check and the rerun
    name the file in the log, delete it and redo that block; the result is the uninterrupted run's."""
    _, whole, whole_losses = _run(quantized, tmp_path / "whole")
    _run(quantized, tmp_path / "damaged")
    path = tmp_path / "damaged" / "block-001.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    piece_checker("reconstruct")(tmp_path / "damaged", "key")
    assert not path.exists() and "block-001.safetensors: cannot read safetensors file" in caplog.text
    path.write_bytes(b"\x00" * 7)  # not even a header length: read by the rerun itself
    _, redone, losses = _run(quantized, tmp_path / "damaged")
    assert losses == whole_losses and path.exists()
    assert all(torch.equal(redone[n].salient_weight, qw.salient_weight) for n, qw in whole.items())
