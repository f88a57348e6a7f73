"""Recover GPTQ checkpoints that gptqmodel wrote, against the same settings quantized here (issue 15).

    python benchmarks/bench_import.py [--settings 4:128:1 3:-1:0] [--work DIR]

For each ``BITS:GROUP:DESC_ACT`` setting, gptqmodel 7.6.0 quantizes SmolLM2-135M-Instruct (float32,
symmetric, damp 0.01, on the demo recipe's calibration windows) into a GPTQ v1 checkpoint; then three
``gift-quant recover`` runs of the demo recipe (60 steps, 16 salient columns a layer, 48 for down_proj,
no noise) differ only in where the quantized weights come from:

* ``import + full precision``: ``model.ref`` the checkpoint, ``model.full_precision`` SmolLM2 (metric gift);
* ``import only``: the checkpoint alone (metric quik: without the original weights there is no ``D``);
* ``quantized here``: SmolLM2 quantized by the project at the same bits and group size (metric gift).

Each run is a separate process (gptqmodel patches torch on import). Prints one markdown table: the
perplexity of every model each report scores (20 Wikipedia windows of 512 tokens) and the stage times.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import DEMO, recover

from gift_quant.data import calibration_windows, eval_windows
from gift_quant.recipe_file import load_recipe
from gift_quant.sources import load_tokenizer, resolve_model

COMMON = ["eval.tasks=[]", "export.formats=[gift]"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["4:128:1", "3:-1:0"], help="BITS:GROUP:DESC_ACT")
    ap.add_argument("--work", default=None, help="keep checkpoints and runs here (default: a temp folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    fp = resolve_model(load_recipe(DEMO).model.ref)
    recipe = load_recipe(DEMO)
    tok = load_tokenizer(recipe.model.ref)
    torch.save(calibration_windows(recipe, tok), work / "calib.pt")
    torch.save(eval_windows(recipe, tok), work / "eval.pt")

    print("| checkpoint | run | model in the report | ppl | quantize / import s | train s | evaluate s |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        bits, group, desc = setting.split(":")
        label = f"W{bits} {'row' if group == '-1' else 'g' + group}{' act-order' if desc == '1' else ''}"
        ckpt = work / f"gptqmodel-w{bits}-g{group}-a{desc}"
        if not (ckpt / "config.json").exists():
            res = subprocess.run([sys.executable, str(Path(__file__).with_name("gptqmodel_peer.py")), fp,
                                  str(work / "calib.pt"), str(work / "eval.pt"), bits, group, "0.01", str(ckpt),
                                  "float32", desc], capture_output=True, text=True)
            if not (ckpt / "config.json").exists():
                raise SystemExit(f"gptqmodel failed:\n{res.stderr[-3000:]}")
        grid = [f"quant.bits={bits}", f"quant.group_size={group}"]  # the demo recipe sets them: name the checkpoint's
        # the project's GPTQ on gptqmodel's grid: its symmetric step, no clipping search, act-order as the checkpoint
        own = [*grid, "quant.sym_step=gptq", "quant.clip_steps=1", f"quant.act_order={desc == '1'}".lower(),
               f"quant.dynamic_groups={desc != '1'}".lower()]
        runs = {
            "import + full precision": [f"model.ref={ckpt}", f"model.full_precision={fp}", *grid,
                                        "saliency.metric=gift", "eval.baselines=[fp,salient]"],
            "import only": [f"model.ref={ckpt}", *grid, "saliency.metric=quik", "eval.baselines=[salient]"],
            "quantized here": [*own, "saliency.metric=gift", "eval.baselines=[salient]"],
        }
        for run, sets in runs.items():
            r = recover(work, f"{ckpt.name}-{run.replace(' ', '_').replace('+', 'and')}", COMMON + sets)
            s = {stage: r["stages"][stage]["seconds"] for stage in ("quantize", "train", "evaluate")}
            for model, ppl in ((k, v["ppl"]) for k, v in r["rows"].items()):
                print(f"| {label} | {run} | {model} | {ppl:.2f} | {s['quantize']:.0f} | {s['train']:.0f} | "
                      f"{s['evaluate']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
