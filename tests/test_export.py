"""Exports reload to the in-memory model: gptq+lora through transformers + gptqmodel + peft, and the native files."""

import pytest
import torch

from gift_quant.checkpoint import CheckpointError, load_quantized, save_quantized
from gift_quant.gptq_lora_format import export_gptq_lora
from gift_quant.grid import Grid, rtn
from gift_quant.layers import wrap_quantized
from gift_quant.quantize import rtn_with_columns
from gift_quant.sources import resolve_model

from .conftest import SMOLLM2, needs_gptqmodel, rewrite_gift, tiny_llama


def quantized_tiny(bits=4, group_size=32):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    model = tiny_llama(vocab=len(tok), hidden=128, inter=256)
    results = rtn_with_columns(model, Grid(bits, group_size), lambda _i, _m: torch.tensor([3, 40, 77]))
    for qw in results.values():  # pretend training moved the salient columns
        qw.salient_weight += 0.05
    return model, tok, results


@needs_gptqmodel
def test_gptq_lora_export_loads_in_transformers_gptqmodel_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, results = quantized_tiny()
    export_gptq_lora(model, tok, results, tmp_path / "g")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    wrap_quantized(model, results, "none", 4)
    with torch.no_grad():
        expected = model.eval()(ids).logits

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", device_map="cpu")
    # the packed grid, through gptqmodel's own kernel, equals our dequantization
    x = torch.randn(3, 128)
    lin = loaded.model.layers[1].mlp.up_proj
    torch.testing.assert_close(lin(x.to(lin.scales.dtype)).float(),
                               x @ results["model.layers.1.mlp.up_proj"].dequantize_grid().T, atol=5e-3, rtol=5e-3)
    with_lora = PeftModel.from_pretrained(loaded, tmp_path / "g" / "adapter")
    with torch.no_grad():
        got = with_lora.eval()(ids).logits.float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert loaded.model.embed_tokens.weight.dtype == torch.float16  # the default export dtype, as loaded

    fresh, _, same = quantized_tiny()  # the model above now holds SalientLinear layers
    export_gptq_lora(fresh, tok, same, tmp_path / "bf16", dtype=torch.bfloat16)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", device_map="cpu")
    assert again.model.embed_tokens.weight.dtype == torch.bfloat16  # the dtype asked for is the dtype loaded


def test_native_file_round_trip_and_errors(tmp_path):
    _, _, results = quantized_tiny(3, -1)
    save_quantized(results, tmp_path / "q.safetensors")
    back = load_quantized(tmp_path / "q.safetensors")
    for name, qw in results.items():
        assert torch.equal(back[name].effective_weight(), qw.effective_weight())

    data = (tmp_path / "q.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(tmp_path / "trunc.safetensors")
    with pytest.raises(CheckpointError, match="absent.safetensors: no such file: rerun the stage"):  # not "corrupt"
        load_quantized(tmp_path / "absent.safetensors")

    name = next(iter(results))
    missing = dict(results)
    broken = rtn(torch.randn(8, 8), Grid(3), torch.tensor([1]))
    missing[name] = broken
    save_quantized(missing, tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    del t[f"{name}.scale"]
    save_file(t, tmp_path / "m2.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=f"missing tensor {name}.scale"):
        load_quantized(tmp_path / "m2.safetensors")

    t = load_file(tmp_path / "m.safetensors")
    t[f"{name}.salient_weight"] = torch.zeros(8, 5)
    save_file(t, tmp_path / "m3.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{name}.salient_weight has shape \(8, 5\), expected \(8, 1\)"):
        load_quantized(tmp_path / "m3.safetensors")

    meta_bits = meta["layers"].replace('"bits": 3', '"bits": 2')
    t = load_file(tmp_path / "m.safetensors")
    t[f"{name}.codes"] = torch.full_like(t[f"{name}.codes"], 7)
    save_file(t, tmp_path / "m4.safetensors", metadata={"layers": meta_bits})
    with pytest.raises(CheckpointError, match=f"{name}.codes is not 2-bit"):
        load_quantized(tmp_path / "m4.safetensors")


def test_gift_folder_round_trip_and_config_checks(tmp_path):
    import json

    import gift_quant
    from gift_quant.gift_format import export_gift

    model, tok, results = quantized_tiny(3, 32)
    export_gift(model, tok, results, tmp_path / "n", {})
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    wrap_quantized(model, results, "none", 4)
    with torch.no_grad():
        expected = model.eval()(ids).logits
    loaded, _ = gift_quant.load(tmp_path / "n")
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)  # fp16 salient columns and scales
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == sum(
        qw.salient_weight.numel() for qw in results.values())  # trainable again

    cfg = json.loads((tmp_path / "n/config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (tmp_path / "n/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config.bits = 5"):
        gift_quant.load(tmp_path / "n")
    cfg["quantization_config"]["bits"] = 4
    (tmp_path / "n/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"qweight has shape \(12, 128\), expected \(16, 128\)"):
        gift_quant.load(tmp_path / "n")


def test_gift_folder_loads_with_transformers_from_pretrained(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    import gift_quant
    from gift_quant.gift_format import export_gift
    from gift_quant.layers import SalientLinear

    model, tok, results = quantized_tiny(3, 32)
    export_gift(model, tok, results, tmp_path / "n", {})
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    ours, _ = gift_quant.load(tmp_path / "n")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "n", dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, SalientLinear)
    assert loaded.config.quantization_config.quant_method == "gift"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits)  # the same tensors, the same model
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == sum(
        qw.salient_weight.numel() for qw in results.values())  # trainable again

    rewrite_gift(tmp_path / "n", lambda t: t.pop("model.layers.1.mlp.up_proj.scales"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "n")
    cfg = json.loads((tmp_path / "n/config.json").read_text())
    bad = json.loads(json.dumps(cfg))
    bad["quantization_config"]["layers"]["model.layers.7.mlp.up_proj"] = {"in": 128, "out": 256, "k": 3}
    (tmp_path / "n/config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="model.layers.7.mlp.up_proj, which is not a linear layer"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "n")
    cfg["quantization_config"]["bits"] = 4
    (tmp_path / "n/config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own shape check
        AutoModelForCausalLM.from_pretrained(tmp_path / "n")


@needs_gptqmodel
def test_eval_command_reads_every_export_format(tmp_path):
    import json

    from gift_quant.cli import main
    from gift_quant.gift_format import export_gift
    from gift_quant.layers import merge_to_dense

    model, tok, results = quantized_tiny(4, 32)
    export_gift(model, tok, results, tmp_path / "gift", {})
    export_gptq_lora(model, tok, results, tmp_path / "gptq_lora")
    wrap_quantized(model, results, "none", 4)
    merge_to_dense(model)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ppl = {}
    for fmt in ("gift", "gptq_lora", "dense"):
        args = ["eval", str(tmp_path / fmt), "--tasks", "", "--ppl-data", str(tmp_path / "text.txt"),
                "--ppl-seq-len", "32", "--out", str(tmp_path / f"eval-{fmt}")]
        assert main(args) == 0, fmt
        ppl[fmt] = json.loads((tmp_path / f"eval-{fmt}/summary.json").read_text())["ppl"]
    assert ppl["gift"] == pytest.approx(ppl["dense"], rel=1e-2) and ppl["gptq_lora"] == pytest.approx(ppl["dense"], rel=1e-2)


def test_storage_counts_the_bits_of_each_format(tmp_path):
    from gift_quant.gift_format import export_gift
    from gift_quant.layers import merge_to_dense
    from gift_quant.sizes import bits_per_weight, storage

    model, tok, results = quantized_tiny(3, 32)
    export_gift(model, tok, results, tmp_path / "gift", {})
    wrap_quantized(model, results, "none", 4)
    merge_to_dense(model)
    model.half().save_pretrained(tmp_path / "dense")
    shapes = {n: tuple(qw.codes.shape) for n, qw in results.items()}
    # by hand from the GPTQ v1 layout: words of 32 bits for codes and zeros, fp16 scales and salient
    # columns, int32 g_idx and salient indices
    bits = 0
    for out, n_in in shapes.values():
        groups, k = n_in // 32, 3
        bits += (-(-n_in // 32) * 3 * out + groups * (-(-out // 32)) * 3) * 32 + groups * out * 16 + n_in * 32
        bits += out * k * 16 + k * 32
    weights = sum(o * i for o, i in shapes.values())
    gift = storage(tmp_path / "gift", shapes)
    assert gift["linear_bits_per_weight"] == pytest.approx(bits / weights)
    assert gift["bytes"] == (tmp_path / "gift" / "model.safetensors").stat().st_size
    assert storage(tmp_path / "dense", shapes)["linear_bits_per_weight"] == 16.0
    # the METHOD section 7 formula leaves out g_idx and padding, nothing else
    assert bits_per_weight(results) == pytest.approx(bits / weights - sum(i * 32 for _, i in shapes.values()) / weights,
                                                     rel=0.02)


@needs_gptqmodel
@pytest.mark.slow
def test_every_format_reloads_smollm2(smollm2, tmp_path):
    """Real model, 4-bit group 64 (gptqmodel's CPU kernel needs 576 inputs divisible by the group)."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    from gift_quant.gift_format import export_gift
    from gift_quant.layers import merge_to_dense

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    results = rtn_with_columns(model, Grid(4, 64), lambda _i, m: torch.topk(m.weight.norm(dim=0), 8).indices.sort().values)
    export_gift(model, tok, results, tmp_path / "gift", {})
    export_gptq_lora(model, tok, results, tmp_path / "gptq_lora")
    wrap_quantized(model, results, "none", 4)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    merge_to_dense(model)
    model.half().save_pretrained(tmp_path / "dense")
    del model

    def close(loaded, tol):
        with torch.no_grad():
            got = loaded.eval()(ids).logits.float()
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        assert (got[0, -1].argmax() == expected[0, -1].argmax()).item()

    close(AutoModelForCausalLM.from_pretrained(tmp_path / "gift", dtype=torch.float32), 0.05)
    close(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32), 0.05)
    # gptqmodel's plain torch kernel: its default CPU kernel for 4 bits (aten int4 matmul) rounds the
    # scales to bf16, about 0.3% error a layer, which 30 layers grow past any fp16 tolerance
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq_lora", device_map="cpu", dtype=torch.float32,
                                                quantization_config=GPTQConfig(bits=4, backend="torch"))
    close(PeftModel.from_pretrained(base, tmp_path / "gptq_lora" / "adapter"), 0.05)


def test_lm_eval_command_scores_a_gift_folder(tmp_path):
    """lm-eval's own HF model class loads the gift folder through the registered quantizer."""
    import json

    import gift_quant
    from gift_quant.cli import main
    from gift_quant.evaluate import offline_tasks, zero_shot
    from gift_quant.gift_format import export_gift

    model, tok, results = quantized_tiny(4, 32)
    export_gift(model, tok, results, tmp_path / "gift", {})
    user = tmp_path / "my_tasks"  # a user's own task folder stays beside the offline mirrors
    user.mkdir()
    (user / "my_arc.yaml").write_text((offline_tasks(tmp_path / "filled") / "gq_arc_easy.yaml").read_text()
                                      .replace("task: gq_arc_easy", "task: my_arc"))
    assert main(["lm-eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'gift'},dtype=float32",
                 "--tasks", "gq_arc_easy,my_arc", "--limit", "6", "--device", "cpu", "--batch_size", "2",
                 "--include_path", str(user), "--output_path", str(tmp_path / "out")]) == 0
    all_results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    got = all_results["gq_arc_easy"]
    assert all_results["my_arc"]["acc,none"] == got["acc,none"]  # the same task under the user's name
    loaded, tok2 = gift_quant.load(tmp_path / "gift")
    ours, _ = zero_shot(loaded, tok2, ["gq_arc_easy"], limit=6, batch_size=2)
    assert got["acc,none"] == ours["gq_arc_easy"]["acc"] and got["acc_norm,none"] == ours["gq_arc_easy"]["acc_norm"]


def vllm_accepts(folder) -> None:
    """vLLM's load-time checks of a GPTQ + LoRA folder, as its source writes them (read at commit 00161ce):
    ``GPTQMarlinConfig.TYPE_MAP`` holds (4, sym) and (8, sym) only, ``is_gptq_marlin_compatible`` needs
    quant_method gptq and bits / group_size / sym / desc_act present, ``MARLIN_SUPPORTED_GROUP_SIZES`` is
    [-1, 32, 64, 128]; ``PEFTHelper`` reads r, lora_alpha and target_modules (no rank_pattern), refuses
    modules_to_save and DoRA, scales by lora_alpha / r, and ``validate_legal`` needs r <= --max-lora-rank,
    one of ``MaxLoRARanks``."""
    import json

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and all(qc.get(k) is not None for k in ("bits", "group_size", "sym", "desc_act"))
    assert (qc["bits"], qc["sym"]) in {(4, True), (8, True)} and qc["group_size"] in (-1, 32, 64, 128)
    assert qc["desc_act"] is False and qc.get("checkpoint_format", "gptq") == "gptq"
    ac = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert not ac.get("rank_pattern") and not ac.get("alpha_pattern")  # vLLM would ignore them
    assert not ac.get("modules_to_save") and not ac.get("use_dora") and ac["lora_alpha"] / ac["r"] == 1
    assert ac["r"] <= 512  # the largest of MaxLoRARanks; vllm serve --max-lora-rank must be >= r


@needs_gptqmodel
@pytest.mark.parametrize("bits,group_size", [(3, -1), (2, 32)])
def test_gptq4_lora_holds_the_low_bit_grid_exactly_and_passes_vllms_checks(tmp_path, bits, group_size):
    """A symmetric 2/3-bit grid written as a 4-bit symmetric GPTQ v1 checkpoint: the unpacked codes are the
    low-bit codes shifted by 8 - zero, the scales are the same, and through transformers + gptqmodel + peft it
    gives the logits of the gift export (salient columns of two sizes: the one-rank adapter is zero-padded)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GPTQConfig

    from gift_quant.gift_format import export_gift
    from gift_quant.gptq4_lora_format import write as write_vllm
    from gift_quant.pack import unpack_rows
    from gift_quant.recipe_file import parse_recipe

    model, tok, _ = quantized_tiny()
    wide = {"down_proj"}
    results = rtn_with_columns(model, Grid(bits, group_size), lambda _i, m: torch.tensor(
        [3, 40, 77, 90, 101, 120] if any(m is mod for n, mod in model.named_modules() if n.endswith(tuple(wide)))
        else [3, 40, 77]))
    for qw in results.values():
        qw.salient_weight += 0.05
    r = parse_recipe({"model": {"ref": "-"}, "quant": {"bits": bits, "group_size": group_size},
                      "export": {"formats": ["gptq4_lora", "gift"]}}, "t")
    write_vllm(model, tok, results, tmp_path / "v", r, "gptq")
    export_gift(model, tok, results, tmp_path / "g", {})
    vllm_accepts(tmp_path / "v")
    lora = load_file(tmp_path / "v" / "adapter" / "adapter_model.safetensors")
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]  # k = 3, padded to the rank 6
    assert a.shape == (6, 128) and not a[3:].any() and torch.equal(a[:3].nonzero()[:, 1], torch.tensor([3, 40, 77]))

    files = load_file(tmp_path / "v" / "model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    qw = results[name]
    codes = unpack_rows(files[f"{name}.qweight"], 4, qw.codes.shape[1]).T
    assert torch.equal(codes, qw.codes.long() - 2 ** (bits - 1) + 8)
    assert torch.equal(files[f"{name}.scales"], qw.scale.T.to(torch.float16))
    zeros = unpack_rows(files[f"{name}.qzeros"].T.contiguous(), 4, qw.codes.shape[0])
    assert torch.equal(zeros, torch.full_like(zeros, 7))  # GPTQ v1 stores zero - 1

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gift = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "v", device_map="cpu", dtype=torch.float32,
                                                    quantization_config=GPTQConfig(bits=4, backend="torch"))
        served = PeftModel.from_pretrained(base, tmp_path / "v" / "adapter").eval()(ids).logits.float()
    torch.testing.assert_close(served, gift, atol=2e-2, rtol=2e-2)


def test_gptq4_lora_refuses_what_vllm_cannot_run():
    from gift_quant.recipe import RecipeError
    from gift_quant.recipe_file import parse_recipe

    def refused(quant, match):
        with pytest.raises(RecipeError, match=match):
            parse_recipe({"model": {"ref": "-"}, "quant": quant, "export": {"formats": ["gptq4_lora"]}}, "t")

    refused({"sym": False}, r"gptq4_lora .* quant.sym = false: .*zero points .*set quant.sym: true")
    refused({"group_size": 16}, r"quant.group_size = 16: vLLM's Marlin kernels take group sizes \[-1, 32, 64, 128\]")
    refused({"bits": 8}, r"quant.bits = 8: gptq4_lora embeds 2-, 3- and 4-bit grids")
    refused({"group_size": 128, "act_order": True, "dynamic_groups": False}, r"quant.act_order = true with groups")


@needs_gptqmodel
@pytest.mark.parametrize("fmt", ["gptq_lora", "gptq4_lora"])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_our_loader_loads_every_gptq_export_on_the_cpu(tmp_path, fmt, group_size):
    """``exports.load`` (the report's loader and ``gift-quant eval``'s) gives the gift export's logits for either GPTQ
    format and grid. Per row over 96 and 160 inputs is no group torch's int4 matmul takes, nor are groups of 64 over
    96 inputs (a last partial group, as 128 over SmolLM2's 576): gptqmodel's own choice on the CPU fails at the first
    forward there, so the loader names a kernel that takes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant import exports
    from gift_quant.gift_format import export_gift
    from gift_quant.recipe_file import parse_recipe
    from gift_quant.formats import FORMATS

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    model = tiny_llama(vocab=len(tok), hidden=96, inter=160)
    results = rtn_with_columns(model, Grid(4, group_size), lambda _i, _m: torch.tensor([3, 40, 77]))
    for qw in results.values():
        qw.salient_weight += 0.05
    r = parse_recipe({"model": {"ref": "-"}, "quant": {"bits": 4, "group_size": group_size},
                      "export": {"formats": [fmt, "gift"]}}, "t")
    FORMATS[fmt].write(model, tok, results, tmp_path / fmt, r, "gptq")
    export_gift(model, tok, results, tmp_path / "gift", {})
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "gift", dtype=torch.float32).eval()(ids).logits
        got = exports.load(tmp_path / fmt, torch.float32)[0](ids).logits.float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_a_format_is_one_entry_of_the_table(tmp_path):
    """A format declared once (a ``Format`` in ``formats.FORMATS``, here a dense copy marked by a file of its own) is
    what the recipe accepts, the export stage writes, ``exports.load`` finds, the report scores the exported model
    from (its rank before every other format) and the model card describes; its own check refuses a recipe."""
    import json
    from dataclasses import replace

    from gift_quant import dense_format, exports
    from gift_quant.families import FAMILIES
    from gift_quant.formats import FORMATS, of_folder
    from gift_quant.pipeline import recover
    from gift_quant.recipe import RecipeError

    from .conftest import recipe, tweak
    from .helpers import family_folder

    def write(model, tok, results, out, r, fmt):
        dense_format.write(model, tok, results, out, r, fmt)
        (out / "COPY").write_text(str(len(results)))

    copy = replace(dense_format.FORMAT, name="copy", summary="a marked dense copy", write=write,
                   detect=lambda folder: (folder / "COPY").is_file(), card="copied: {path} ({layers} layers)",
                   card_values=lambda folder: {"layers": (folder / "COPY").read_text()}, score_rank=-1,
                   card_facts=("a copy of the {grid} model",),
                   check=lambda r, shape=None, ck=None: "no copy at 2 bits" if r.quant.bits == 2 else None)
    saved = dict(FORMATS)
    FORMATS.clear()
    FORMATS.update({"copy": copy, **saved})  # asked first: dense takes any folder
    try:
        r = tweak(recipe(family_folder(FAMILIES[0], tmp_path / "model"), tmp_path / "run", ("gift", "copy")),
                  **{"eval.tasks": [], "eval.baselines": ["salient"]})
        with pytest.raises(RecipeError, match="no copy at 2 bits"):
            tweak(r, **{"quant.bits": 2})
        with pytest.raises(RecipeError, match="unknown format 'kopy'; the formats are copy .a marked dense copy.; "
                                             "gift .codes"):
            tweak(r, **{"export.formats": ["kopy"]})
        recover(r)
        folder = tmp_path / "run" / "export" / "copy"
        assert (folder / "COPY").read_text() == "14" and of_folder(folder) is copy
        results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
        assert results["GIFT-SW W3"]["source"] == "export/copy"
        card = (folder / "README.md").read_text()
        assert "copied: . (14 layers)" in card and "- a copy of the W3 sym model" in card
        model, _ = exports.load(folder)
        assert next(model.parameters()).dtype == torch.float16  # the dense loader, the folder's own dtype
    finally:
        FORMATS.clear()
        FORMATS.update(saved)
