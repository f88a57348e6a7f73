"""The ``dense`` export: the recovered model's effective weights (quantized grid with the trained salient
columns put back) as a plain Hugging Face checkpoint in ``export.dtype``: loads anywhere, saves nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .export_format import Format
from .grid import QuantizedWeight
from .integrity import require_sums
from .sources import load_model

if TYPE_CHECKING:
    from .recipe import Recipe


def write(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """``model`` with its GIFT-SW layers merged into plain linears (cast in place: write it last)."""
    model.to(getattr(torch, recipe.export.dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load(folder: Path, dtype: torch.dtype | None, device: torch.device | str):
    """Any model ``sources.load_model`` takes (an export folder checked against its ``SHA256SUMS`` first), float32
    where no dtype is given."""
    if Path(folder).is_dir():
        require_sums(folder)
    model, tok = load_model(str(folder), dtype or torch.float32)
    return model.to(device), tok


def any_model(_folder: Path) -> bool:
    return True


LOAD = ("```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{path}\")\n```")

FORMAT = Format("dense", "effective weights", write, load, any_model, LOAD, score_rank=1, holds_quantized=False)
