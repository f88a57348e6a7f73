"""The ``dense`` export: the recovered model's effective weights (quantized grid with the trained salient
columns put back) as a plain Hugging Face checkpoint in ``export.dtype``: loads anywhere, saves nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .grid import QuantizedWeight

if TYPE_CHECKING:
    from .recipe import Recipe


def write(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """``model`` with its GIFT-SW layers merged into plain linears (cast in place: write it last)."""
    model.to(getattr(torch, recipe.export.dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
