"""An exported folder of any format, loaded the way a user loads it: ``gift`` through our loader (the same
model ``AutoModelForCausalLM.from_pretrained`` gives after ``import gift_quant``), ``gptq_lora`` through
transformers + gptqmodel + peft, ``dense`` (and any plain model) through transformers. The report scores the
exports through here, so what it measures is what ships; ``gift-quant eval`` loads through here too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .integrity import require_sums
from .sources import load_model
from .verify import is_gift_folder


def kind(folder: Path) -> str:
    """``gift``, ``gptq_lora`` (a GPTQ checkpoint with a PEFT adapter beside it) or ``model`` (anything else)."""
    folder = Path(folder)
    if is_gift_folder(folder):
        return "gift"
    if (folder / "adapter" / "adapter_config.json").exists():
        return "gptq_lora"
    return "model"


def load(ref: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of an export folder (checked against its ``SHA256SUMS`` first) or a model reference;
    ``dtype`` of the unquantized tensors (None: the folder's own for ``gptq_lora``, float32 otherwise); ``device``
    where it loads (gptqmodel picks its kernel for it).
    A ``gptq_lora`` folder needs gptqmodel (the ``gptq`` extra) and a kernel of it for this device and shape; its
    errors come through as they are (``ImportError``, or what gptqmodel raises)."""
    folder = Path(ref)
    what = kind(folder)
    if what == "gift":  # the registered quantizer checks the weights' sha256 and the folder's SHA256SUMS
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, device_map=str(device))
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    if folder.is_dir():
        require_sums(folder)  # an export copied here checks against its own SHA256SUMS
    if what == "gptq_lora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(folder, device_map=str(device), **({"dtype": dtype} if dtype else {}))
        return PeftModel.from_pretrained(base, folder / "adapter").eval(), AutoTokenizer.from_pretrained(folder)
    return load_model(str(ref), dtype or torch.float32)
