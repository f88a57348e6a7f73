"""Report from fixture result files: the numbers in the table and the recovery ratios parse back."""
import json
import math
import re

import pytest
import torch

from gift_quant.cli import main
from gift_quant.grid import Grid, rtn
from gift_quant.sizes import bits_per_weight

TASKS = ["gq_arc_easy", "gq_boolq"]


def fixture_run(root, name, ppl, acc):
    d = root / name
    (d / "evaluate").mkdir(parents=True)
    (d / "quantize").mkdir()
    rows = {}
    for label, p, a in zip(["full precision", "GPTQ W3", "GIFT-SW W3"], ppl, acc):
        rows[label] = {"ppl": p, "eval_s": 1.0,
                       "tasks": {"gq_arc_easy": {"acc": a, "acc_norm": a + 0.01}, "gq_boolq": {"acc": a - 0.1},
                                 "mean_acc": (a + a - 0.1) / 2}}
    (d / "evaluate/results.json").write_text(json.dumps(rows))
    (d / "quantize/manifest.json").write_text(json.dumps({"seconds": 12.0, "bits_per_weight": 3.25}))
    (d / "recipe.json").write_text(json.dumps({"model": {"ref": "tiny"}}))
    return d


def parse_table(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 5 and not cells[0] in ("model",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_numbers_and_recovery(tmp_path):
    run = fixture_run(tmp_path, "a", ppl=[10.0, 30.0, 15.0], acc=[0.6, 0.4, 0.55])
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep/report.md").read_text()
    rows = parse_table(text)
    assert float(rows["GIFT-SW W3"][0]) == 15.0
    assert rows["GPTQ W3"][1] == "0.4000 / 0.4100" and float(rows["GPTQ W3"][3]) == pytest.approx(0.35)
    # perplexity: (15 - 30) / (10 - 30) = 75%; mean acc: (0.5 - 0.35) / (0.55 - 0.35) = 75%
    m = re.search(r"vs GPTQ W3: perplexity ([\d.]+)%, mean acc ([\d.]+)%", text)
    assert float(m.group(1)) == pytest.approx(75.0) and float(m.group(2)) == pytest.approx(75.0)
    assert "3.250 bits per weight" in text
    assert (tmp_path / "rep/perplexity.png").stat().st_size > 1000 and (tmp_path / "rep/tasks.png").exists()


def test_recovery_is_undefined_without_a_gap(tmp_path):
    # quantized mean acc 0.65 above full precision's 0.55: no gap to close; perplexity 9 < 10 likewise
    run = fixture_run(tmp_path, "a", ppl=[10.0, 9.0, 15.0], acc=[0.6, 0.7, 0.55])
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep/report.md").read_text()
    assert "vs GPTQ W3: perplexity n/a (no worse than full precision), mean acc n/a (no worse than full precision)" in text


def test_report_of_two_runs_prefixes_labels(tmp_path):
    a = fixture_run(tmp_path, "a", [10.0, 30.0, 15.0], [0.6, 0.4, 0.55])
    b = fixture_run(tmp_path, "b", [10.0, 20.0, 12.0], [0.6, 0.5, 0.58])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    rows = parse_table((tmp_path / "rep/report.md").read_text())
    assert float(rows["b: GIFT-SW W3"][0]) == 12.0 and float(rows["a: GIFT-SW W3"][0]) == 15.0


def test_stage_times_name_every_finished_stage_in_the_order_it_finished(tmp_path):
    import os

    run = fixture_run(tmp_path, "a", [10.0, 30.0, 15.0], [0.6, 0.4, 0.55])
    for i, (stage, seconds) in enumerate([("quantize", 12.0), ("reconstruct", 300.4), ("teacher", 20.0),
                                          ("train", 99.6)]):  # a new stage is listed without the report knowing it
        m = run / stage / "manifest.json"
        m.parent.mkdir(exist_ok=True)
        m.write_text(json.dumps({"seconds": seconds}))
        os.utime(m, (1000 + i, 1000 + i))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert ("Stage wall times of `a` (s, in the order they finished): quantize 12, reconstruct 300, teacher 20, "
            "train 100") in (tmp_path / "rep/report.md").read_text()


def test_report_of_a_run_without_results_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no evaluate/results.json" in capsys.readouterr().err


def test_bits_per_weight_matches_method_arithmetic():
    # LLaMA-2-7B-like layer: 4096 x 4096, 3 bits, groups of 128, k = 128 salient columns
    w = torch.randn(4096, 4096)
    qw = rtn(w, Grid(3, 128), torch.arange(0, 4096, 32))
    exact = (3 * 3968 + 19 * 32 + 16 * 128) / 4096 + 32 * 128 / 4096**2
    assert bits_per_weight({"l": qw}) == pytest.approx(exact)
    method = (3 + 19 / 128) * (1 - 128 / 4096) + 16 * 128 / 4096  # METHOD section 7
    assert bits_per_weight({"l": qw}) == pytest.approx(method, rel=0.01)


def test_uncertainty_columns_and_within_noise_line(tmp_path):
    from gift_quant.evaluate import interval

    nll = torch.tensor([2.0, 2.2, 2.4, 2.6], dtype=torch.float64)
    lo, hi = interval(nll)
    half = 1.96 * float(nll.std()) / 2  # sd / sqrt(4)
    assert (lo, hi) == pytest.approx((math.exp(2.3 - half), math.exp(2.3 + half)))

    d = tmp_path / "run"
    (d / "evaluate").mkdir(parents=True)
    (d / "recipe.json").write_text(json.dumps({"model": {"ref": "tiny"}}))
    def row(ppl, ci, acc, se):
        return {"ppl": ppl, "ppl_ci95": ci, "tasks": {"gq_boolq": {"acc": acc, "acc_stderr": se},
                                                      "mean_acc": acc, "mean_acc_stderr": se}}
    rows = {"full precision": row(10.0, [9.0, 11.0], 0.60, 0.01), "GPTQ W3": row(30.0, [28.0, 32.0], 0.50, 0.01),
            "GIFT-SW W3": row(10.5, [9.5, 11.5], 0.58, 0.01)}
    (d / "evaluate/results.json").write_text(json.dumps(rows))
    assert main(["report", str(d), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep/report.md").read_text()
    assert "| GIFT-SW W3 | 10.500 (9.50-11.50) | 0.5800 ± 0.010 | 0.5800 ± 0.010 |" in text
    # intervals overlap only for full precision / GIFT-SW; accuracies 0.02 apart < 1.96 * sqrt(2) * 0.01 = 0.0277
    assert "Perplexity within noise (95% intervals from the spread of the windows overlap): " \
           "full precision / GIFT-SW W3." in text
    assert "Mean accuracy within noise (less than 1.96 combined standard errors apart): " \
           "full precision / GIFT-SW W3." in text
    assert "indicative only" not in text
    rows["GPTQ W3"]["tasks"]["mean_acc_stderr"] = 0.03
    (d / "evaluate/results.json").write_text(json.dumps(rows))
    main(["report", str(d), "--out", str(tmp_path / "rep")])
    assert "indicative only: the mean accuracy's standard error reaches 0.030" in (tmp_path / "rep/report.md").read_text()


def test_model_card_front_matter_and_serving_command():
    from gift_quant.card import model_card
    from gift_quant.gptq4_lora_format import serve_command

    recipe = {"name": "m", "model": {"ref": "org/base"}, "quant": {"bits": 3, "group_size": 128, "sym": True,
              "method": "gptq"}, "saliency": {"k": 128, "metric": "owq", "k_overrides": {}},
              "train": {"mode": "post", "steps": 300, "noise": "none", "distill": 1.0, "data": "c4.txt"},
              "reconstruct": {"enabled": True}}
    rows = {"full precision": {"ppl": 5.47, "ppl_ci95": [5.3, 5.6]}, "GIFT-SW W3 g128": {"ppl": 5.9, "ppl_ci95": [5.7, 6.1],
            "source": "export/gift"}}
    card = model_card("gptq4_lora", recipe, rows, "GIFT-SW W3 g128", {"linear_bits_per_weight": 4.25, "bytes": 4e9},
                      {"license": "llama2"}, {"serve": " ".join(serve_command(".", 128))})
    assert card.startswith('---\nbase_model: "org/base"\nlicense: "llama2"\n')
    assert "| **GIFT-SW W3 g128** | 5.900 (5.70-6.10) | - |" in card and "| full precision | 5.470 (5.30-5.60) | - |" in card
    assert ("python -m vllm.entrypoints.openai.api_server --model . --dtype float16 --enable-lora --lora-modules "
            "salient=./adapter --max-lora-rank 128") in card
    assert "training text c4.txt, block-wise reconstruction on" in card
    assert "license" not in model_card("gift", recipe, rows, "GIFT-SW W3 g128", {}, {}).split("---")[1]
