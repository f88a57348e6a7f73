"""What an export format declares: the one record the pipeline, the loaders, the checks and the model cards read.

Each format lives in one module (``gift_format``, ``gptq_lora_format``, ``gptq4_lora_format``, ``dense_format``) that
ends with its ``FORMAT``; ``formats.FORMATS`` registers them in one table. A new format is a new module and a line
there (PEFT's dispatchers, llm-compressor's registries).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .gptq_checkpoint import GPTQCheckpoint
    from .plan import Shape
    from .recipe import Recipe


def no_problem(_recipe: Recipe, _shape: Shape | None = None, _ck: GPTQCheckpoint | None = None) -> str | None:
    return None


def no_values(_folder: Path) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Format:
    """An export format (``export.formats`` names it)."""

    name: str
    summary: str  # what it is, one phrase (the recipe field's description)
    write: Callable[..., None]  # (model, tokenizer, results, out, recipe, fmt): the export stage writes the folder
    load: Callable[..., tuple[Any, Any]]  # (folder, dtype, device) -> (model, tokenizer), as a user loads it
    detect: Callable[[Path], bool]  # whether a folder is one (asked in the table's order; the last takes any model)
    card: str  # the model card's "Load" section: markdown with {path} and the keys of ``card_values``
    score_rank: int  # the report scores the exported model from the loadable format of the lowest rank
    card_values: Callable[[Path], dict[str, str]] = no_values  # more values for ``card`` from the written folder
    card_facts: tuple[str, ...] = ()  # lines the card adds about what the folder stores ({grid}: W3 g128 sym)
    holds_quantized: bool = True  # packs quantized layers (a full-precision run has nothing to write in it)
    needs_kernel: bool = False  # loads through gptqmodel's kernels, which may lack this device or grid
    check: Callable[..., str | None] = no_problem  # (recipe, shape=None, ck=None): why the run cannot write it
    verify: Callable[[Path], list[str]] | None = None  # more than the checksums for ``gift-quant verify``
