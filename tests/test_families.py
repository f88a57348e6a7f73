"""Every model family of ``gift_quant.families`` run whole: a tiny random model of the family through ``recover``
with every baseline and every export format, in float32 and bfloat16; each export loaded back the way a user loads
it (``exports.load``) and scored against the report's row. The fast tier keeps Llama; ``make test`` runs them all."""
import json
import math

import pytest
import torch

from gift_quant.data import eval_windows
from gift_quant.evaluate import window_nll
from gift_quant.families import FAMILIES, layer_types
from gift_quant.layers import merge_to_dense
from gift_quant.pipeline import recover

from .conftest import needs_gptqmodel, recipe, tweak
from .helpers import family_folder

FORMATS = ("dense", "gift", "gptq_lora", "gptq4_lora")
CASES = [pytest.param(f, dtype, {}, marks=() if f.name == "llama" else pytest.mark.slow, id=f"{f.name}-{dtype}")
         for f in FAMILIES for dtype in ("float32", "bfloat16")]
# every weight reconstructed block by block (new codes and grid) before training: the exports and kernels take it alike
EVERY_WEIGHT = {"reconstruct.enabled": True, "reconstruct.train": "weights", "reconstruct.init": "fp",
                "reconstruct.epochs": 1, "reconstruct.weights_lr": 1e-3, "reconstruct.scales_lr": 1e-4}
CASES.append(pytest.param(FAMILIES[0], "bfloat16", EVERY_WEIGHT, id="llama-bfloat16-every-weight"))


def scored(model, r, tok) -> float:
    """Perplexity of a loaded export as the report scores a model: plain linears, the recipe's windows."""
    merge_to_dense(model)
    return math.exp(float(window_nll(model.eval(), eval_windows(r, tok), r.eval.batch_size).mean()))


@needs_gptqmodel
@pytest.mark.parametrize("family,dtype,sets", CASES)
def test_the_family_runs_whole_and_every_export_scores_as_reported(family, dtype, sets, tmp_path):
    from gift_quant import exports

    folder = family_folder(family, tmp_path / "model")
    out = tmp_path / "run"
    r = tweak(recipe(folder, out, FORMATS), **{"model.dtype": dtype, "export.dtype": dtype,
                                              "saliency.targets": list(family.projections),
                                              "saliency.k_overrides": {"down_proj": 8},
                                              "eval.baselines": ["fp", "rtn", "gptq", "salient", "lora"], **sets})
    recover(r)
    results = json.loads((out / "evaluate/results.json").read_text())
    lora = next(label for label in results if "LoRA" in label)
    untrained = {"GPTQ W3 + salient columns"} | ({"GPTQ W3 + salient columns reconstructed"} if sets else set())
    assert set(results) == {"full precision", "RTN W3", "GPTQ W3", "GIFT-SW W3", lora} | untrained
    assert all(math.isfinite(row["ppl"]) for row in results.values())
    assert results["GIFT-SW W3"]["source"] == "export/gift" and results[lora]["source"] == "lora/export"
    want = torch.float32 if dtype == "float32" else torch.bfloat16
    for fmt in FORMATS:
        model, tok = exports.load(out / "export" / fmt, want)
        assert next(model.parameters()).dtype == want or fmt.startswith("gptq")
        ppl = scored(model, r, tok)
        if fmt == "gift":  # the row the report scored, loaded again: the very same number
            assert ppl == results["GIFT-SW W3"]["ppl"]
        else:  # the same trained weights in another packing (fp16 scales, GPTQ kernels): the same model
            assert ppl == pytest.approx(results["GIFT-SW W3"]["ppl"], rel=0.02), fmt
    model, tok = exports.load(out / "lora/export", want)
    assert scored(model, r, tok) == results[lora]["ppl"]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_calibration_gives_each_block_the_arguments_of_its_kind(family, tmp_path):
    """Block by block (``run_blocks``, as quantization and reconstruction stream the model), every block's output
    equals the whole model's hidden state after it: each kind of block (sliding window or full, Gemma 3's own
    rotary base) gets the mask and rotary embedding the model gives it, from sequences longer than the window."""
    from transformers import AutoModelForCausalLM

    from gift_quant.calibrate import block_output, run_blocks
    from gift_quant.families import decoder_layers

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.tiny_config(256)).eval()
    windows = torch.randint(0, 256, (4, 48))
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [block.register_forward_hook(lambda _m, _i, out, i=i: outputs.setdefault(i, []).append(
        block_output(out).detach().clone())) for i, block in enumerate(decoder_layers(model))]
    with torch.no_grad():
        model(windows)  # the whole model: each block called as the model calls it
    whole = {i: o[0] for i, o in outputs.items()}
    outputs.clear()
    run_blocks(model, windows, list(family.projections), lambda *_: None, batch_size=2, true_sequential=False)
    for h in hooks:
        h.remove()
    for i, want in whole.items():  # the last two calls of each block: its final pass over the two batches
        torch.testing.assert_close(torch.cat(outputs[i][-2:]), want, rtol=1e-5, atol=1e-5)
    assert len(set(layer_types(model))) == (2 if family.name.startswith("gemma") else 1)
