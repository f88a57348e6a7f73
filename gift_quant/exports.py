"""An exported folder of any format, loaded the way a user loads it: each format's own loader (``formats``),
found from the folder (``gift``: our quantizer through ``from_pretrained``; a GPTQ checkpoint with its adapter:
transformers + gptqmodel + peft; anything else, ``dense`` and plain models: transformers). The report scores the
exports through here, so what it measures is what ships; ``gift-quant eval`` loads through here too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import folder_config
from .formats import of_folder


def saved_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a folder's ``config.json`` says its model was saved in (``dtype``, or ``torch_dtype`` as
    transformers 4 wrote it); None where there is no such folder or field."""
    data = folder_config(folder)
    name = data.get("dtype") or data.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load(ref: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of an export folder (checked against its ``SHA256SUMS`` first) or a model reference;
    ``dtype`` of the unquantized tensors (None: the folder's own, ``saved_dtype``; float32 where it names none);
    ``device`` where it loads (gptqmodel picks its kernel for it)."""
    folder = Path(ref)
    return of_folder(folder).load(folder, dtype or saved_dtype(folder), device)
