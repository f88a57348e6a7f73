"""The staged pipeline end to end on a tiny Llama (SmolLM2's tokenizer): stages, skip, resume, change detection."""
import json
import math

import pytest
import torch

from gift_quant import pipeline
from gift_quant.integrity import sha256
from gift_quant.pipeline import recover
from gift_quant.recipe import RecipeError
from gift_quant.rundir import RunError

from .conftest import crash_at, needs_gptqmodel, recipe, tweak


def test_recover_end_to_end_skip_and_change_detection(tiny_folder, tmp_path, caplog):
    out = tmp_path / "run"
    report = recover(recipe(tiny_folder, out))
    text = report.read_text()
    results = json.loads((out / "evaluate/results.json").read_text())
    assert set(results) == {"full precision", "RTN W3", "GPTQ W3", "GPTQ W3 + salient columns", "GIFT-SW W3"}
    for label, row in results.items():  # the report shows the measured numbers, with their uncertainty
        lo, hi = row["ppl_ci95"]
        assert lo < row["ppl"] < hi and row["ppl_windows"] == 4
        assert f"| {label} | {row['ppl']:.3f} ({lo:.2f}-{hi:.2f}) | {row['tasks']['gq_piqa']['acc']:.4f} / " in text
    assert (out / "evaluate/lm_eval/GIFT-SW_W3.json").exists()
    assert (out / "report/perplexity.png").exists() and (out / "report/loss.png").exists()
    assert (out / "export/dense/config.json").exists() and (out / "export/gift/model.safetensors").exists()
    assert (out / "export/gptq_lora/adapter/adapter_config.json").exists()
    assert not list(out.glob(".*tmp*"))  # nothing half-written
    errors = json.loads((out / "quantize/manifest.json").read_text())["gptq_error"]  # GPTQ's loss per layer
    assert len(errors) == 2 * 7 and all(e["error"] > 0 and e["error_salient"] > 0 for e in errors.values())
    # what the report scores is what ships: the GIFT-SW row is the gift export loaded anew, as a user loads it
    from transformers import AutoModelForCausalLM

    from gift_quant.data import eval_windows
    from gift_quant.evaluate import window_nll
    from gift_quant.layers import merge_to_dense
    from gift_quant.sources import load_tokenizer

    r = recipe(tiny_folder, out)
    shipped = AutoModelForCausalLM.from_pretrained(out / "export/gift", dtype=torch.float32)
    merge_to_dense(shipped)  # as the report scores every model: plain linears, the same weights
    nll = window_nll(shipped, eval_windows(r, load_tokenizer(str(tiny_folder))), r.eval.batch_size)
    assert results["GIFT-SW W3"]["source"] == "export/gift"
    assert results["GIFT-SW W3"]["ppl"] == math.exp(float(nll.mean()))
    assert results["GPTQ W3"]["source"].startswith("in memory") and "GIFT-SW W3 from `export/gift`" in text
    row = results["GIFT-SW W3"]  # every export's model card holds the report's numbers for it
    for fmt in ("dense", "gift", "gptq_lora"):
        card = (out / "export" / fmt / "README.md").read_text()
        assert card.startswith(f"---\nbase_model: \"{tiny_folder}\"") and "from_pretrained" in card
        assert (f"| **GIFT-SW W3** | {row['ppl']:.3f} ({row['ppl_ci95'][0]:.2f}-{row['ppl_ci95'][1]:.2f}) | "
                f"{row['tasks']['mean_acc']:.4f} ± {row['tasks']['mean_acc_stderr']:.3f} |") in card
        assert f"{json.loads((out / 'export/sizes.json').read_text())['formats'][fmt]['linear_bits_per_weight']:.3f}" in card
    cards = json.loads((out / "report/manifest.json").read_text())["cards"]
    assert cards["export/gift/README.md"] == sha256(out / "export/gift/README.md")

    stamps = {s: (out / s / "manifest.json").stat().st_mtime_ns for s in ("quantize", "train", "export", "evaluate")}
    with caplog.at_level("INFO", logger="gift_quant.pipeline"):
        recover(recipe(tiny_folder, out))
    assert caplog.text.count("done, skipped") == 6  # quantize, plain (the GPTQ baseline), train, export, ...
    assert stamps == {s: (out / s / "manifest.json").stat().st_mtime_ns for s in stamps}

    with pytest.raises(RunError, match="stage 'train' .* different recipe.*--from train"):
        recover(recipe(tiny_folder, out, lr=5e-3))
    recover(recipe(tiny_folder, out, lr=5e-3), from_stage="train")
    assert (out / "quantize/manifest.json").stat().st_mtime_ns == stamps["quantize"]  # earlier stage kept
    for stage in ("quantize", "train", "evaluate"):  # every stage says where it ran and what it took there
        m = json.loads((out / stage / "manifest.json").read_text())
        assert m["device"] == "cpu" and m["peak_memory_bytes"] > 0


def test_a_run_that_does_not_fit_is_refused_before_loading(tiny_folder, tmp_path, monkeypatch):
    import gift_quant.plan
    import gift_quant.rundir

    monkeypatch.setattr(gift_quant.plan, "capacity", lambda _d: 2**20)
    monkeypatch.setattr(gift_quant.rundir, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(RecipeError, match="stage quantize needs about .* GiB on cpu"):
        recover(recipe(tiny_folder, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("*/manifest.json"))


@pytest.mark.slow
def test_recover_resumes_interrupted_training(tiny_folder, tmp_path):
    out = tmp_path / "run"

    with pytest.raises(KeyboardInterrupt):
        recover(recipe(tiny_folder, out), on_step=crash_at(3, KeyboardInterrupt()))
    assert (out / "quantize/manifest.json").exists() and not (out / "train").exists()
    assert (out / "train.work/checkpoints/latest").read_text() == "step-2"
    recover(recipe(tiny_folder, out))
    manifest = json.loads((out / "train/manifest.json").read_text())
    assert manifest["steps_run"] == 2  # steps 3 and 4 only
    steps = [json.loads(x)["step"] for x in (out / "train/train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3, logged before the crash and run again, appears once

    straight = tmp_path / "straight"
    recover(recipe(tiny_folder, straight))
    from safetensors.torch import load_file

    a, b = load_file(out / "train/trainable.safetensors"), load_file(straight / "train/trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_recover_under_torchrun_two_processes(tiny_folder, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    data = recipe(tiny_folder, tmp_path / "run").model_dump(mode="json")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "gift_quant.cli", "recover", str(tmp_path / "r.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run/report/report.md").exists()
    log = (tmp_path / "run/train/train_log.jsonl").read_text().splitlines()
    assert len(log) == 4 and '"tokens_per_s"' in log[0]
    assert json.loads((tmp_path / "run/train/manifest.json").read_text())["processes"] == 2


@pytest.mark.parametrize("mode", ["pre", "fp"])
def test_pre_and_full_precision_modes(tiny_folder, tmp_path, mode):
    from safetensors.torch import load_file

    from gift_quant.checkpoint import load_quantized

    out = tmp_path / mode
    recover(recipe(tiny_folder, out, ["dense"] if mode == "fp" else ["dense", "gift"], mode=mode, noise_bits=3))
    results = json.loads((out / "evaluate/results.json").read_text())
    idx = load_file(out / "train/salient_idx.safetensors")
    trained = load_file(out / "train/trainable.safetensors")
    name = "model.layers.1.mlp.down_proj"
    assert idx[name].numel() == 8 and trained[f"{name}.salient_weight"].shape == (64, 8)
    if mode == "fp":
        assert not (out / "quantize").exists()
        assert set(results) == {"full precision", "RTN W3", "GPTQ W3", "GIFT-SW full precision"}
        assert results["GIFT-SW full precision"]["ppl"] != results["full precision"]["ppl"]  # the columns moved
    else:
        assert set(results) == {"full precision", "RTN W3", "GPTQ W3", "GPTQ W3 + salient columns", "Pre-GIFT-SW W3"}
        q = load_quantized(out / "quantize/quantized.safetensors")[name]
        assert torch.equal(q.salient_idx, idx[name])  # quantized with the columns that were trained
        # the train stage ran before quantize, so its manifest is older
        assert (out / "train/manifest.json").stat().st_mtime_ns < (out / "quantize/manifest.json").stat().st_mtime_ns


@pytest.mark.parametrize("mode, every, fewest", [
    # every optional stage wanted / none wanted (written out by hand: the orders the stage keys depend on)
    ("post", ["quantize", "plain", "reconstruct", "generate", "teacher", "train", "lora", "export", "evaluate", "report"],
     ["quantize", "train", "export", "evaluate", "report"]),
    ("pre", ["generate", "teacher", "train", "quantize", "plain", "export", "evaluate", "report"],
     ["train", "quantize", "export", "evaluate", "report"]),
    ("fp", ["plain", "generate", "teacher", "train", "export", "evaluate", "report"],
     ["train", "export", "evaluate", "report"]),
])
def test_stage_order_of_each_mode_and_its_plan(tiny_folder, tmp_path, mode, every, fewest):
    """A stage is in a run where its recipe wants it, at the mode's place for it; the plan covers exactly the
    run's stages that hold memory of their own (train with train.enabled: false holds none)."""
    base = tweak(recipe(tiny_folder, tmp_path / "run", ["dense"]), **{"train.mode": mode})
    wants = {"train.data": "generated", "generate.seq_len": 64, "train.distill": 1.0, "train.distill_topk": 4,
             "eval.baselines": ["fp", "gptq"] + (["lora"] if mode == "post" else [])}
    if mode == "post":
        wants["reconstruct.enabled"] = True
    full = tweak(base, **wants)
    assert pipeline.stages(full) == every
    assert pipeline.stages(tweak(base, **{"eval.baselines": ["fp"]})) == fewest
    planned = pipeline.plan_recipe(full, torch.device("cpu"))["stages"]
    assert list(planned) == [s for s in every if s in ("quantize", "reconstruct", "generate", "teacher", "train",
                                                        "lora", "evaluate")]
    assert all(st["knob"] and st["bytes"] == sum(st["parts"].values()) for st in planned.values())
    assert "train" not in pipeline.plan_recipe(tweak(base, **{"train.enabled": False}), torch.device("cpu"))["stages"]


def test_fp_mode_refuses_packed_exports(tiny_folder, tmp_path):
    with pytest.raises(RecipeError, match=r"train.mode=fp .*export.formats: \[dense\]"):
        recipe(tiny_folder, tmp_path, mode="fp")


def test_lora_baseline_stage(tiny_folder, tmp_path, monkeypatch):
    """eval.baselines: lora trains a PEFT LoRA of the salient columns' size on the plain GPTQ model, exports it
    as GPTQ + adapter and scores it; the plain GPTQ baseline reuses its quantization (quantized once)."""
    from gift_quant import modes

    calls = []
    original = modes.quantize_model
    monkeypatch.setattr(modes, "quantize_model", lambda *a, **k: calls.append(1) or original(*a, **k))
    r = recipe(tiny_folder, tmp_path / "run", ["dense"])
    data = r.model_dump(mode="json")
    data["eval"]["baselines"] = ["fp", "gptq", "salient", "lora"]
    from gift_quant.recipe_file import parse_recipe

    r = parse_recipe(data, "test")
    assert pipeline.stages(r) == ["quantize", "plain", "train", "lora", "export", "evaluate", "report"]
    recover(r)
    out = tmp_path / "run"
    # tiny Llama: hidden 64, kv 32, MLP 128; salient k = 4 (down_proj 8) a layer, 2 blocks
    salient = 2 * (4 * (64 + 32 + 32 + 64 + 128 + 128) + 8 * 64)
    per_rank = 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    rank = round(salient / per_rank)
    m = json.loads((out / "lora/manifest.json").read_text())
    assert (m["salient"], m["rank"], m["trainable"]) == (salient, rank, rank * per_rank)
    results = json.loads((out / "evaluate/results.json").read_text())
    assert set(results) == {"full precision", "GPTQ W3", "GPTQ W3 + salient columns", "GIFT-SW W3",
                            f"GPTQ W3 + LoRA r={rank}"}
    assert results[f"GPTQ W3 + LoRA r={rank}"]["ppl"] != results["GPTQ W3"]["ppl"]  # the adapter was trained
    assert len(calls) == 2  # the quantize and plain stages; the LoRA stage and evaluate reuse the plain one
    assert results[f"GPTQ W3 + LoRA r={rank}"]["source"] == "lora/export"  # transformers + gptqmodel + peft
    assert json.loads((out / "lora/export/config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert json.loads((out / "lora/export/adapter/adapter_config.json").read_text())["r"] == rank
    assert len((out / "lora/train_log.jsonl").read_text().splitlines()) == 4
    assert f"GPTQ W3 + LoRA r={rank}" in (out / "report/report.md").read_text()


def test_the_shipped_demo_recipe_passes_its_input_checks(smollm2):
    """The demo's model is a GGUF inside a package (pkg://): not an imported GPTQ checkpoint, and every
    check before the weights load passes (the smollm2 fixture has converted the GGUF once)."""
    from gift_quant.checks import check_inputs
    from gift_quant.modes import Post, mode_for
    from gift_quant.recipe_file import load_recipe

    checked = check_inputs(load_recipe("smollm2-135m-instruct-w3"))
    assert checked.imported is None and type(mode_for(checked.recipe, checked.imported)) is Post


def test_gptq_error_summary_names_the_worst_layers():
    from gift_quant.stages import error_summary

    errors = {"a.q_proj": {"error": 1.0, "error_salient": 1.0}, "b.down_proj": {"error": 3.0, "error_salient": 0.0},
              "c.k_proj": {"error": 0.5, "error_salient": 0.0}}
    line = error_summary(errors, worst=2)  # avoided 1 of 4.5 + 1 = 5.5
    assert line == ("GPTQ error: 4.5 over 3 layers; the salient columns avoid 18.2% of what quantizing them too "
                    "would give; largest: b.down_proj 3, a.q_proj 1")


@needs_gptqmodel
def test_the_vllm_export_is_what_the_report_scores(tiny_folder, tmp_path):
    """export.formats: [gptq4_lora] alone: the GIFT-SW row is scored from that folder through transformers +
    gptqmodel + peft, and the folder passes vLLM's checks."""
    from .test_export import vllm_accepts

    out = tmp_path / "run"
    recover(recipe(tiny_folder, out, ["gptq4_lora"], steps=2))
    results = json.loads((out / "evaluate/results.json").read_text())
    assert results["GIFT-SW W3"]["source"] == "export/gptq4_lora"
    vllm_accepts(out / "export/gptq4_lora")
    adapter = json.loads((out / "export/gptq4_lora/adapter/adapter_config.json").read_text())
    assert adapter["r"] == 8  # one rank, down_proj's k; the other projections' 4 columns zero-padded to it


def test_learned_scales_change_the_exported_scales_and_nothing_else(tiny_folder, tmp_path):
    """train.learn_scales: the gift export's codes and salient indices are the quantize stage's, bit for bit; its
    scales are the trained ones, and the folder loaded anew gives the trained model's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gift_quant.checkpoint import load_quantized
    from gift_quant.layers import merge_to_dense
    from gift_quant.pack import to_gptq

    out = tmp_path / "run"
    r = recipe(tiny_folder, out, ["gift", "dense"], learn_scales=True, scales_lr=1e-2)  # large: some reach the floor
    recover(r)
    before = load_quantized(out / "quantize/quantized.safetensors")
    trained = load_file(out / "train/trainable.safetensors")
    shipped = load_file(out / "export/gift/model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    plain = to_gptq(before[name])
    assert torch.equal(shipped[f"{name}.qweight"], plain["qweight"]) and torch.equal(shipped[f"{name}.g_idx"], plain["g_idx"])
    assert torch.equal(shipped[f"{name}.salient_idx"].long(), before[name].salient_idx)
    assert not torch.equal(shipped[f"{name}.scales"], plain["scales"])  # trained
    assert torch.equal(shipped[f"{name}.scales"], trained[f"{name}.base.scale"].T.to(torch.float16))
    assert all((t > 0).all() for n, t in trained.items() if n.endswith("base.scale"))  # kept positive

    from gift_quant.pipeline import open_run

    run = open_run(r)
    model = run.mode.recovered(run, trained=True)[0]
    merge_to_dense(model)
    gift = AutoModelForCausalLM.from_pretrained(out / "export/gift", dtype=torch.float32)
    merge_to_dense(gift)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gift(ids).logits, model(ids).logits, atol=2e-2, rtol=2e-2)  # fp16 in the file


def test_learned_scales_are_refused_without_a_grid(tiny_folder, tmp_path):
    with pytest.raises(RecipeError, match=r"train.learn_scales = true, but train.mode = pre .*no grid scales"):
        recipe(tiny_folder, tmp_path, mode="pre", learn_scales=True)


def test_reconstruct_stage_feeds_training_the_export_and_the_report(tiny_folder, tmp_path):
    """reconstruct.enabled with learned scales and norms, training without scales: the stage runs between quantize
    and train; its layers keep the quantize stage's codes and indices and carry new salient columns and scales;
    training starts from them, the gift export ships its scales and the blocks' trained norms, and the report scores
    the reconstructed model beside the untrained one."""
    from safetensors.torch import load_file

    from gift_quant.checkpoint import load_quantized

    out = tmp_path / "run"
    r = tweak(recipe(tiny_folder, out, ["gift"]), **{"reconstruct.enabled": True, "reconstruct.learn_scales": True,
                                                      "reconstruct.scales_lr": 1e-3, "reconstruct.lr": 1e-3,
                                                      "reconstruct.norms": True, "reconstruct.norms_lr": 1e-2,
                                                      "eval.tasks": [], "eval.baselines": ["gptq", "salient"]})
    order = pipeline.stages(r)
    assert order.index("quantize") < order.index("reconstruct") == order.index("train") - 1
    recover(r)
    before = load_quantized(out / "quantize/quantized.safetensors")
    after = load_quantized(out / "reconstruct/quantized.safetensors")
    for name, qw in before.items():
        assert torch.equal(after[name].codes, qw.codes) and torch.equal(after[name].salient_idx, qw.salient_idx)
        assert not torch.equal(after[name].scale, qw.scale)
    manifest = json.loads((out / "reconstruct/manifest.json").read_text())
    assert len(manifest["blocks"]) == 2 and all(b["after"] < b["before"] for b in manifest["blocks"])
    name = "model.layers.0.self_attn.q_proj"
    shipped = load_file(out / "export/gift/model.safetensors")
    assert torch.equal(shipped[f"{name}.scales"], after[name].scale.T.to(torch.float16))
    norms, fp = load_file(out / "reconstruct/norms.safetensors"), load_file(tiny_folder / "model.safetensors")
    assert len(norms) == 4  # two blocks, two norms each
    for n, w in norms.items():
        assert not torch.equal(w, fp[n]) and torch.equal(shipped[n], w.to(shipped[n].dtype))
    log = [json.loads(line) for line in (out / "train/train_log.jsonl").read_text().splitlines()]
    assert log  # trained on top
    results = json.loads((out / "evaluate/results.json").read_text())
    plain, rec = results["GPTQ W3 + salient columns"]["ppl"], results["GPTQ W3 + salient columns reconstructed"]["ppl"]
    assert plain != rec and "GIFT-SW W3" in results


@pytest.mark.parametrize("reconstruct", [False, True])
def test_an_untrained_run_scores_its_export(tiny_folder, tmp_path, reconstruct):
    """train.enabled: false: the export holds the quantized model (reconstructed where the run reconstructs) and the
    report scores it from there, once, beside the untrained baseline where that is another model; before, the
    evaluate stage scored nothing and the report failed at the end of the run."""
    out = tmp_path / "run"
    r = tweak(recipe(tiny_folder, out, ["gift"]), **{"train.enabled": False, "eval.tasks": [],
                                                      "eval.baselines": ["salient"], "reconstruct.enabled": reconstruct,
                                                      "reconstruct.lr": 1e-3})
    recover(r)
    results = json.loads((out / "evaluate/results.json").read_text())
    rows = ["GPTQ W3 + salient columns"] + (["GPTQ W3 + salient columns reconstructed"] if reconstruct else [])
    assert list(results) == rows and results[rows[-1]]["source"] == "export/gift"
    assert (out / "report/report.md").exists()
    if reconstruct:  # the baseline in memory is another model than the reconstructed export
        assert results[rows[0]]["source"] != "export/gift" and results[rows[0]]["ppl"] != results[rows[1]]["ppl"]


def test_report_rows_name_salient_columns_only_where_a_target_keeps_them(tiny_folder, tmp_path):
    """k = 0 on every target is plain quantization: its untrained row must not claim salient columns (it did, and a
    no-salient comparison read as one with columns); one target with columns is enough to keep the name."""
    from gift_quant.modes import mode_for
    from gift_quant.rundir import Run
    from gift_quant.stages import scored_models

    def labels(r):
        mode = mode_for(r, None)
        return [label for label, _ in scored_models(Run(r, pipeline.run_stages(r, mode), mode, torch.device("cpu")))]

    base = tweak(recipe(tiny_folder, tmp_path / "run", ["gift"]), **{"eval.baselines": ["fp", "salient"]})
    assert labels(base) == ["full precision", "GPTQ W3 + salient columns", "GIFT-SW W3"]
    none = tweak(base, **{"saliency.k": 0, "saliency.k_overrides": {}, "reconstruct.enabled": True})
    assert labels(none) == ["full precision", "GPTQ W3 (no salient columns)",
                            "GPTQ W3 (no salient columns) reconstructed", "GIFT-SW W3"]
    assert labels(tweak(base, **{"saliency.k": 0}))[1] == "GPTQ W3 + salient columns"  # down_proj keeps 8


def test_an_untrained_full_precision_run_without_baselines_is_refused(tiny_folder, tmp_path):
    base = recipe(tiny_folder, tmp_path / "run", ["dense"])
    with pytest.raises(RecipeError, match=r"train.enabled = false with train.mode = fp and no eval.baselines"):
        tweak(base, **{"train.enabled": False, "train.mode": "fp", "eval.baselines": []})
    tweak(base, **{"train.enabled": False, "train.mode": "fp", "eval.baselines": ["fp", "gptq"]})  # scores these


def test_reconstruct_is_refused_where_nothing_is_quantized_before_training(tiny_folder, tmp_path):
    with pytest.raises(RecipeError, match=r"reconstruct.enabled = true, but train.mode = pre has no quantized model"):
        tweak(recipe(tiny_folder, tmp_path, mode="pre"), **{"reconstruct.enabled": True})


def test_a_killed_evaluation_resumes_at_the_request_it_reached(tiny_folder, tmp_path, monkeypatch):
    """lm-eval's answers are cached as they come (``evaluate.work/<key>/``): a kill in the second scored model
    redoes only the requests not yet answered, and the results are those of a run never killed."""
    from lm_eval.models.huggingface import HFLM

    real, calls, crash = HFLM._model_call, [], {"after": None}

    def counted(self, *args, **kwargs):  # one call a batch of requests
        if crash["after"] is not None and len(calls) == crash["after"]:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", counted)
    sets = {"eval.baselines": ["fp"], "eval.limit": 6}  # two models, 12 piqa requests each, 2 a batch
    recover(tweak(recipe(tiny_folder, tmp_path / "straight", ["gift"]), **sets))
    straight = len(calls)
    assert straight == 12

    out = tmp_path / "run"
    calls.clear()
    crash["after"] = 8  # the fp model's 6 batches and 2 of GIFT-SW's
    with pytest.raises(KeyboardInterrupt):
        recover(tweak(recipe(tiny_folder, out, ["gift"]), **sets))
    assert not (out / "evaluate").exists() and len(list((out / "evaluate.work").glob("*/*.db"))) == 2
    calls.clear()
    crash["after"] = None
    recover(tweak(recipe(tiny_folder, out, ["gift"]), **sets))
    assert len(calls) == straight - 8  # GIFT-SW's 4 batches not answered before the kill, nothing else
    a, b = (json.loads((d / "evaluate/results.json").read_text()) for d in (tmp_path / "straight", out))
    assert a.keys() == b.keys() == {"full precision", "GIFT-SW W3"}
    for label in a:
        assert a[label]["ppl"] == b[label]["ppl"] and a[label]["tasks"] == b[label]["tasks"]


def test_a_finished_stage_leaves_no_model_behind(tiny_folder, tmp_path, monkeypatch):
    """The trained model is freed when the train stage ends, though accelerate's bf16 autocast binds its ``forward``
    to it, a reference cycle only the cycle collector frees (collection off here, as it may not run for a long time
    in a real run: on a GPU the model would stay on the device through export and evaluate)."""
    import gc
    import weakref

    from gift_quant import stages

    trained, after = [], {}
    train, run_stage = stages.train, pipeline._run_stage
    monkeypatch.setattr(stages, "train", lambda model, *a, **k: trained.append(weakref.ref(model)) or train(
        model, *a, **k))
    monkeypatch.setattr(pipeline, "_run_stage", lambda run, name, *a, **k: (
        run_stage(run, name, *a, **k), after.update({name: trained and trained[0]() is None})))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # bf16 in a process that trained in float32 before
    gc.collect()
    gc.disable()
    try:
        r = tweak(recipe(tiny_folder, tmp_path / "run", ["dense"]), **{"eval.baselines": [], "train.precision": "bf16"})
        recover(r)
    finally:
        gc.enable()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert after["train"] is True


def test_quantize_command_scores_its_own_stage_whatever_stages_follow(tiny_folder, tmp_path):
    """``gift-quant quantize`` runs only the quantize stage: a recipe that reconstructs after it scores the same
    model (it once looked for the reconstruct stage's layers, which this command never makes)."""
    alone = pipeline.quantize(recipe(tiny_folder, tmp_path / "alone"))
    followed = pipeline.quantize(tweak(recipe(tiny_folder, tmp_path / "followed"), **{"reconstruct.enabled": True}))
    assert followed["perplexity"] == alone["perplexity"] and math.isfinite(alone["perplexity"])
    assert not (tmp_path / "followed/reconstruct").exists()
