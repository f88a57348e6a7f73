"""The command line as a user meets it: quiet start, JSON on stdout, named recipes, named extras."""
import json
import os
import subprocess
import sys

import pytest

import gift_quant
from gift_quant.evaluate import require


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gift_quant.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_version_prints_nothing_else():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gift-quant {gift_quant.__version__}"
    assert out.stderr == ""  # no import-time warnings of other libraries


def test_help_does_not_import_the_quantizer_registry_yet_a_gift_folder_loads(tmp_path):
    """``--help`` stays quick: importing gift_quant leaves transformers' quantizer registry (seconds of imports)
    alone; the gift quantizer is registered when something imports that registry, so a fresh process that
    imports gift_quant first and transformers after still loads a gift folder through from_pretrained."""
    out = _cli("recover", "--help")
    assert out.returncode == 0 and "--from" in out.stdout and out.stderr == ""
    code = ("import sys, gift_quant; assert 'transformers.quantizers.auto' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'gift')!r}); "
            "print(type(m.model.layers[0].mlp.up_proj).__name__)")
    from gift_quant.gift_format import export_gift

    from .test_export import quantized_tiny

    model, tok, results = quantized_tiny(4, 32)
    export_gift(model, tok, results, tmp_path / "gift", {})
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and res.stdout.strip() == "SalientLinear", res.stderr[-2000:]


def test_plan_of_a_shipped_recipe_by_name_prints_json_only():
    out = _cli("plan", "llama-2-7b-w3", "--device", "cpu", "-q")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # stdout is the JSON alone; the table went to stderr
    assert result["params"] == 6_738_415_616 and "memory plan on cpu" in out.stderr
    bad = _cli("plan", "no-such-recipe")
    assert bad.returncode == 2 and "shipped: gemma-2-9b-w3" in bad.stderr and bad.stdout == ""


def test_a_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"not_installed_xyz is not installed; install the extra: "
                                          r"pip install 'gift-quant\[eval\]'"):
        require("not_installed_xyz", "eval")


def test_stdout_is_the_json_even_when_a_library_prints(tmp_path, capsys, monkeypatch):
    import gift_quant.report
    from gift_quant.cli import main

    def chatty(runs, out):
        print("GPT-QModel banner")  # what gptqmodel does on import when peft pulls it in
        return out / "report.md"

    monkeypatch.setattr(gift_quant.report, "write_report", chatty)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"report": str(tmp_path / "rep" / "report.md")} and "GPT-QModel banner" in err


def test_eval_loads_a_folder_in_its_own_dtype_unless_told(tmp_path, capsys):
    """``gift-quant eval --dtype``: auto (the default) is the dtype the folder's config.json names; a named one
    wins; the perplexity is the model's in that dtype (scored here by hand as the reference)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant.cli import main
    from gift_quant.data import nonoverlapping_windows
    from gift_quant.evaluate import window_nll
    from gift_quant.sources import SMOLLM2, WIKI, read_text, resolve_model, tokenize

    from .conftest import tiny_llama

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    tiny_llama(vocab=len(tok)).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    common = ["--tasks", "", "--ppl-data", WIKI, "--ppl-seq-len", "64", "--ppl-max-windows", "2", "--batch-size", "2"]
    for flag, want in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        assert main(["eval", str(tmp_path / "m"), *common, *flag]) == 0
        summary = json.loads(capsys.readouterr().out)
        windows = nonoverlapping_windows(tokenize(tok, read_text(WIKI)), 64, 2)
        assert summary["dtype"] == str(want).removeprefix("torch.") and summary["device"] == "cpu"
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=want)  # rotary tables in float32
        assert summary["ppl"] == math.exp(float(window_nll(reference, windows, 2).mean()))
