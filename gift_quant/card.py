"""The model card of every export (``README.md`` in the folder, the Hugging Face convention).

It says what a stranger who finds the folder needs before using it: the base model, the recipe, the
bits (the grid's, and per weight on disk in this format), the report's numbers for this model beside
full precision and the untrained quantization, with their intervals, and how to load it (and, for
``gptq4_lora``, how to serve it with vLLM). The numbers exist only after evaluation, so the report stage
writes the cards; each is written whole (a temporary name, then a rename) and its sha256 goes into the
report stage's manifest, while the folder's own ``SHA256SUMS`` keeps covering the weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .formats import FORMATS
from .integrity import sha256


def model_card(fmt: str, recipe: dict, rows: dict[str, dict], label: str, sizes: dict, config: dict,
               values: dict[str, str] | None = None) -> str:
    """The card's markdown: YAML front matter (base model, license where the config has one, tags), then the
    numbers of ``rows[label]`` (the exported model) beside the baselines, sizes and how to load it (the format's
    ``card``, filled with ``values``: its ``card_values`` of the written folder)."""
    q, sal = recipe["quant"], recipe["saliency"]
    grid = f"W{q['bits']}" + ("" if q["group_size"] == -1 else f" g{q['group_size']}") + (" sym" if q["sym"] else " asym")
    front = ["---", f"base_model: {json.dumps(recipe['model']['ref'])}", "library_name: transformers",
             f"tags: [gift-quant, gift-sw, gptq, {q['bits']}-bit]"]
    if config.get("license"):
        front.insert(2, f"license: {json.dumps(config['license'])}")
    what = ("kept in full precision" if recipe["train"]["mode"] == "fp" else f"quantized to {grid} with "
            f"{q['method'].upper()}, {sal['k']} salient input columns a layer ({sal['metric']} metric, overrides "
            f"{', '.join(f'{k}: {v}' for k, v in (sal.get('k_overrides') or {}).items()) or 'none'}) kept in full precision")
    lines = [*front, "---", "", f"# {recipe['name']} ({fmt})", "",
             f"`{recipe['model']['ref']}` {what}, its salient columns fine-tuned (GIFT-SW), by gift-quant.", "",
             f"- bits per weight of the quantized linears in this folder: {sizes.get('linear_bits_per_weight', float('nan')):.3f}"
             f" ({sizes.get('bytes', 0) / 1e6:.1f} MB on disk)",
             *(f"- {fact.format(grid=grid)}" for fact in FORMATS[fmt].card_facts),
             f"- recipe: train.mode {recipe['train']['mode']}, {recipe['train']['steps']} steps, noise "
             f"{recipe['train']['noise']}, distillation {recipe['train']['distill']}, training text "
             f"{recipe['train']['data']}, block-wise reconstruction "
             f"{'on' if recipe['reconstruct']['enabled'] else 'off'}", "",
             "| model | perplexity (95% interval) | mean accuracy ± standard error |", "|---|---|---|"]
    for name, row in rows.items():
        tasks = row.get("tasks") or {}
        acc = f"{tasks['mean_acc']:.4f} ± {tasks.get('mean_acc_stderr', float('nan')):.3f}" if tasks else "-"
        lo, hi = row.get("ppl_ci95", (float("nan"), float("nan")))
        mark = "**" if name == label else ""
        lines.append(f"| {mark}{name}{mark} | {row['ppl']:.3f} ({lo:.2f}-{hi:.2f}) | {acc} |")
    source = rows.get(label, {}).get("source", "")
    lines += ["", f"The bold row is this model; the report scored it from `{source}`." if source else "",
              "", "## Load", "", FORMATS[fmt].card.format(path=".", **(values or {}))]
    return "\n".join(lines) + "\n"


def write_cards(run_dir: Path, label: str) -> dict[str, str]:
    """``README.md`` in every export folder of a run; returns the sha256 of each card by its path in the run."""
    recipe = json.loads((run_dir / "recipe.json").read_text())
    rows = json.loads((run_dir / "evaluate" / "results.json").read_text())
    sizes = json.loads((run_dir / "export" / "sizes.json").read_text()).get("formats", {})
    written = {}
    for fmt in recipe["export"]["formats"]:
        folder = run_dir / "export" / fmt
        config = json.loads((folder / "config.json").read_text())
        text = model_card(fmt, recipe, rows, label, sizes.get(fmt, {}), config, FORMATS[fmt].card_values(folder))
        tmp = folder / "README.md.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / "README.md")
        written[f"export/{fmt}/README.md"] = sha256(folder / "README.md")
    return written
