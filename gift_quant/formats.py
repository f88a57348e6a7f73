"""The export formats, one table, in writing order (``dense`` last: it casts the model in place) and detection order
(``gptq4_lora`` before ``gptq_lora``, whose folder it also is; ``dense`` takes any model, so it is asked last)."""
from __future__ import annotations

from pathlib import Path

from . import dense_format, gift_format, gptq4_lora_format, gptq_lora_format
from .export_format import Format

FORMATS: dict[str, Format] = {f.name: f for f in (gift_format.FORMAT, gptq4_lora_format.FORMAT,
                                                  gptq_lora_format.FORMAT, dense_format.FORMAT)}


def of_folder(folder: Path | str) -> Format:
    """The format of an export folder (a model reference that is no folder, or any plain model: ``dense``)."""
    return next(f for f in FORMATS.values() if f.detect(Path(folder)))


def by_score_rank(names: list[str]) -> list[Format]:
    """The named formats in the order the report tries them for the exported model's row."""
    return sorted((FORMATS[n] for n in names), key=lambda f: f.score_rank)
