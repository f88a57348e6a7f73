"""GPTQ checkpoints written by gptqmodel as the pipeline's input: read exactly, refused by name, recovered."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gift_quant import gptq_checkpoint, pipeline
from gift_quant.checkpoint import CheckpointError, load_quantized
from gift_quant.gift_format import export_gift
from gift_quant.recipe import RecipeError

from .conftest import SMOLLM2, needs_gptqmodel, recipe, tiny_llama, tweak

# (checkpoint_format, desc_act, bits, group_size, sym): v1 and v2, act-order on and off, groups and per-row
CASES = [("gptq", 1, 3, 32, 1), ("gptq_v2", 1, 4, 32, 0), ("gptq", 0, 4, -1, 1), ("gptq_v2", 0, 3, 32, 1),
         ("gptq", 1, 2, -1, 0)]
PACKED = ("qweight", "qzeros", "scales", "g_idx")
# under pytest-xdist --dist loadgroup: one worker writes the checkpoints once, not every worker
pytestmark = pytest.mark.xdist_group("gptqmodel_checkpoints")


@pytest.fixture(scope="session")
def fp_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    from gift_quant.sources import resolve_model

    folder = tmp_path_factory.mktemp("fp128")
    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    tiny_llama(vocab=len(tok), hidden=128, inter=256).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write(fp: Path, folder: Path, case: tuple) -> Path:
    """``case`` of ``fp`` written by gptqmodel in its own process, with its loader's reference outputs."""
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("gptqmodel_worker.py")), str(fp),
                          str(folder), *map(str, case)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return folder


@pytest.fixture(scope="session")
def checkpoints(fp_folder, tmp_path_factory):
    """Every case of CASES written by gptqmodel."""
    pytest.importorskip("gptqmodel")
    root = tmp_path_factory.mktemp("gptq")
    return {case: _write(fp_folder, root / "_".join(map(str, case)), case) for case in CASES}


def _assert_equals_reference(folder: Path, layers_expected: int) -> dict:
    """The import's dequantized weights and logits against gptqmodel's, saved by the worker."""
    ref = torch.load(folder / "reference.pt", weights_only=True)
    model, _, layers = gptq_checkpoint.load(gptq_checkpoint.read_config(str(folder)))
    assert set(layers) == set(ref["weights"]) and len(layers) == layers_expected
    for name, w in ref["weights"].items():
        assert torch.equal(layers[name].dequantize_grid(), w), name
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], atol=1e-5, rtol=1e-5)
    return layers


@needs_gptqmodel
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_import_equals_gptqmodels_loader(checkpoints, case):
    """Dequantized weights and logits of the import equal those of gptqmodel's own loader and kernel."""
    folder = checkpoints[case]
    ck = gptq_checkpoint.read_config(str(folder))
    assert (ck.fmt, int(ck.desc_act), ck.bits, ck.group_size, int(ck.sym)) == case
    layers = _assert_equals_reference(folder, 14)
    if case[1] and case[3] != -1:  # act-order with groups: the groups are scattered over the columns
        assert all(qw.g_idx is not None for qw in layers.values())


@needs_gptqmodel
def test_import_of_a_qwen2_checkpoint_keeps_the_biases_of_quantized_layers(tmp_path):
    """Qwen2's q/k/v projections carry biases: they are read beside the packed tensors, and the logits
    still equal gptqmodel's."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from gift_quant.sources import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # not the zeros they start as
    model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    folder = _write(tmp_path / "fp", tmp_path / "q", ("gptq", 1, 4, 32, 0))
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(folder / "model.safetensors")
    _assert_equals_reference(folder, 14)


@needs_gptqmodel
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["v1-act-order", "v2-act-order-asym"])
def test_exports_keep_the_imported_tensors_bit_identical(checkpoints, case, tmp_path):
    """The gift and gptq+lora exports of an import write the checkpoint's packed tensors back unchanged, and
    the gift folder loads to the same model (act-order groups included)."""
    import gift_quant  # noqa: F401  registers the gift format with transformers
    from gift_quant.gift_format import load
    from gift_quant.gptq_lora_format import export_gptq_lora
    from gift_quant.layers import wrap_quantized

    folder = checkpoints[case]
    ck = gptq_checkpoint.read_config(str(folder))
    model, tok, layers = gptq_checkpoint.load(ck)
    for qw in layers.values():  # two salient columns a layer, moved off their grid values
        qw.salient_idx = torch.tensor([3, 70])
        qw.salient_weight = qw.dequantize_grid()[:, qw.salient_idx] + 0.01
    export_gift(model, tok, layers, tmp_path / "gift", {}, ck.fmt)
    export_gptq_lora(model, tok, layers, tmp_path / "gptq_lora", fmt=ck.fmt)
    original = load_file(folder / "model.safetensors")
    for out in ("gift", "gptq_lora"):
        written = load_file(tmp_path / out / "model.safetensors")
        for name in layers:
            for f in PACKED:
                assert torch.equal(written[f"{name}.{f}"], original[f"{name}.{f}"].to(written[f"{name}.{f}"].dtype)), \
                    (out, name, f)
    qc = json.loads((tmp_path / "gptq_lora" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == ck.fmt and qc["desc_act"] is True and qc["sym"] == ck.sym
    assert json.loads((tmp_path / "gift" / "config.json").read_text())["quantization_config"]["sym"] == ck.sym

    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    wrap_quantized(model, layers, "none", 4)
    loaded, _ = load(tmp_path / "gift")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=2e-3, rtol=2e-3)


def test_quant_method_of_every_kind_of_reference(tmp_path, tiny_folder):
    """Only a folder whose config says gptq is imported; a package GGUF (the demo's model), a plain folder, a
    hub id that is not cached and a missing path are not, and none of them raises here."""
    assert gptq_checkpoint.quant_method(SMOLLM2) is None
    assert gptq_checkpoint.quant_method(str(tiny_folder)) is None
    assert gptq_checkpoint.quant_method("nobody/not-cached-anywhere") is None
    assert gptq_checkpoint.quant_method("./no/such/folder") is None
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert gptq_checkpoint.quant_method(str(tmp_path / "q")) == "gptq"


def _rewrite_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a checkpoint folder with ``quantization_config`` entries changed."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@needs_gptqmodel
def test_a_checkpoint_that_disagrees_with_its_config_is_refused_by_name(checkpoints, tmp_path):
    folder = checkpoints[CASES[0]]  # 3-bit
    wrong_bits = gptq_checkpoint.read_config(str(_rewrite_config(folder, tmp_path / "b", bits=4)))
    with pytest.raises(CheckpointError, match=r"down_proj.qweight has shape \(24, 128\), but config.json \(bits 4, group_size 32\) implies \(32, 128\)"):
        gptq_checkpoint.load(wrong_bits)
    with pytest.raises(CheckpointError, match="checkpoint_format = 'marlin'"):
        gptq_checkpoint.read_config(str(_rewrite_config(folder, tmp_path / "m", checkpoint_format="marlin")))
    with pytest.raises(CheckpointError, match="bits = 5"):
        gptq_checkpoint.read_config(str(_rewrite_config(folder, tmp_path / "5", bits=5)))
    broken = _rewrite_config(folder, tmp_path / "g", bits=3)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.g_idx"] = torch.full((128,), 9, dtype=torch.int32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj.g_idx holds groups outside 0..3"):
        gptq_checkpoint.load(gptq_checkpoint.read_config(str(broken)))


@needs_gptqmodel
def test_damaged_shards_and_nan_scales_of_a_gptqmodel_checkpoint_are_named_up_front(checkpoints, tmp_path, no_weights,
                                                                                   capsys):
    """A truncated shard, a header that declares a shape its bytes do not hold, and a NaN in a layer's scales: one
    line naming the file (and the tensor), exit 1, before any weights load or calibration starts."""
    import shutil
    import struct

    import yaml

    from gift_quant.cli import main

    src = checkpoints[CASES[0]]
    data = (src / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    victim = "model.layers.0.mlp.up_proj.qweight"
    header[victim]["shape"] = [header[victim]["shape"][0] * 2, header[victim]["shape"][1]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    nan = load_file(src / "model.safetensors")
    nan["model.layers.1.self_attn.k_proj.scales"][0, 3] = float("nan")
    damages = {"truncated": (lambda f: f.write_bytes(data[: len(data) // 2]), "incomplete metadata"),
               "lying": (lambda f: f.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :]), "invalid shape"),
               "nan": (lambda f: save_file(nan, str(f), metadata={"format": "pt"}),
                       r"tensor model.layers.1.self_attn.k_proj.scales holds 1 scale\(s\) that are not finite")}
    for name, (damage, why) in damages.items():
        folder = shutil.copytree(src, tmp_path / name)
        damage(folder / "model.safetensors")
        r = tweak(recipe(str(folder), tmp_path / f"run-{name}"),
                  **{"saliency.metric": "quik", "eval.baselines": ["salient"], "eval.tasks": []})
        with pytest.raises(CheckpointError, match=why):
            pipeline.recover(r)
        path = tmp_path / f"{name}.yaml"
        fields = r.model_dump(mode="json")
        del fields["quant"]  # the checkpoint's own grid
        path.write_text(yaml.safe_dump(fields))
        capsys.readouterr()
        assert main(["recover", str(path)]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(folder) in last, last
        if name != "nan":
            assert f"{folder}/model.safetensors" in last and "copy the checkpoint again" in last
    with pytest.raises(CheckpointError, match="not finite"):  # the loader checks the same (a direct import)
        nan_ck = tmp_path / "nan"
        gptq_checkpoint.read_layers(gptq_checkpoint.read_config(str(nan_ck)), _meta_model(nan_ck))


def _meta_model(folder: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@needs_gptqmodel
def test_import_recipes_are_checked_before_any_weights_load(checkpoints, fp_folder, tiny_folder, tmp_path, no_weights):
    folder = str(checkpoints[CASES[0]])

    def imported(**changes):
        r = recipe(folder, tmp_path / "run")
        model = {**r.model.model_dump(), **changes.pop("model", {})}
        return r.model_copy(update={"model": r.model.model_copy(update=model), **changes})

    base = imported()
    with pytest.raises(RecipeError, match="needs the full-precision weights.*quik"):
        pipeline.recover(base)  # the default metric (gift) scores D, which needs model.full_precision
    quik = base.saliency.model_copy(update={"metric": "quik"})
    with pytest.raises(RecipeError, match=r"\['fp'\] need the full-precision model"):
        pipeline.recover(imported(saliency=quik, eval=base.eval.model_copy(update={"baselines": ["fp", "salient"]})))
    with pytest.raises(RecipeError, match="train.distill = 1.0"):
        pipeline.recover(imported(saliency=quik, train=base.train.model_copy(update={"distill": 1.0}),
                                  eval=base.eval.model_copy(update={"baselines": ["salient"]})))
    for train, what in (("columns", "each block"), ("weights", "every weight from the full-precision weights")):
        with pytest.raises(RecipeError, match=rf"reconstruct.enabled = true \(reconstruct.train = {train}\): "
                           rf"reconstruction trains {what} against .* set model.full_precision"):
            pipeline.recover(imported(saliency=quik, reconstruct=base.reconstruct.model_copy(
                update={"enabled": True, "train": train}), eval=base.eval.model_copy(update={"baselines": ["salient"]})))
    from gift_quant.recipe_file import parse_recipe

    data = base.model_dump(mode="json")
    data["quant"] = {"bits": 4}
    with pytest.raises(RecipeError, match="quant.bits = 4, but the GPTQ checkpoint .* has bits 3"):
        pipeline.recover(parse_recipe(data, "test"))
    with pytest.raises(RecipeError, match=r"quantizes \['down_proj', 'gate_proj'"):
        pipeline.recover(imported(saliency=quik.model_copy(update={"targets": ["q_proj"]})))
    with pytest.raises(RecipeError, match="hidden_size 64, the GPTQ checkpoint 128"):
        pipeline.recover(imported(model={"full_precision": str(tiny_folder)}))
    with pytest.raises(RecipeError, match="only for a GPTQ checkpoint in model.ref"):
        pipeline.recover(recipe(str(fp_folder), tmp_path / "x").model_copy(update={"model": base.model.model_copy(
            update={"ref": str(fp_folder), "full_precision": str(fp_folder)})}))


@needs_gptqmodel
@pytest.mark.slow
def test_recover_an_imported_checkpoint_with_and_without_full_precision(checkpoints, fp_folder, tmp_path):
    """The whole pipeline on a gptqmodel act-order checkpoint: codes kept bit-identical through training and
    export, salient columns from the full-precision weights corrected for the imported codes' error (or the
    dequantized ones), the import scored."""
    folder = checkpoints[CASES[0]]
    original = load_file(folder / "model.safetensors")
    fp_model = load_model_plain(fp_folder)
    for full_precision, metric in ((None, "quik"), (str(fp_folder), "gift")):
        r = recipe(str(folder), tmp_path / metric, formats=("gift", "gptq_lora"))
        r = r.model_copy(update={
            "model": r.model.model_copy(update={"full_precision": full_precision}),
            "saliency": r.saliency.model_copy(update={"metric": metric}),
            "eval": r.eval.model_copy(update={"baselines": ["salient", "lora"] + (["fp"] if full_precision else []),
                                              "tasks": []})})
        report = pipeline.recover(r)
        run = report.parents[1]
        quantized = load_quantized(run / "quantize" / "quantized.safetensors")
        _, _, layers = gptq_checkpoint.load(gptq_checkpoint.read_config(str(folder)))
        moved = 0
        for name, qw in quantized.items():
            assert torch.equal(qw.codes, layers[name].codes) and torch.equal(qw.g_idx, layers[name].g_idx)
            if full_precision:  # the full-precision columns, corrected for the imported codes' error
                fp_cols = fp_model.get_submodule(name).weight[:, qw.salient_idx]
                moved += not torch.equal(qw.salient_weight, fp_cols)
                assert (qw.salient_weight - fp_cols).abs().max() < fp_cols.abs().max()
            else:  # the dequantized columns
                assert torch.equal(qw.salient_weight, layers[name].dequantize_grid()[:, qw.salient_idx]), name
        assert moved == (len(quantized) if full_precision else 0)
        written = load_file(run / "export" / "gift" / "model.safetensors")
        for name in quantized:
            assert all(torch.equal(written[f"{name}.{f}"], original[f"{name}.{f}"]) for f in PACKED)
        rows = json.loads((run / "evaluate" / "results.json").read_text())
        assert "GPTQ W3 g32 (imported)" in rows and "GIFT-SW W3 g32" in rows
        assert any(k.startswith("GPTQ W3 g32 (imported) + LoRA r=") for k in rows)
        assert ("full precision" in rows) == bool(full_precision)


def load_model_plain(folder):
    from gift_quant.sources import load_model

    return load_model(str(folder))[0]
