"""An exported folder of any format, loaded the way a user loads it: ``gift`` through our loader (the same
model ``AutoModelForCausalLM.from_pretrained`` gives after ``import gift_quant``), ``gptq_lora`` through
transformers + gptqmodel + peft, ``dense`` (and any plain model) through transformers. The report scores the
exports through here, so what it measures is what ships; ``gift-quant eval`` loads through here too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .integrity import require_sums
from .kernels import INT4_GROUPS
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


def _config(folder: Path) -> dict:
    """A folder's ``config.json`` ({} where there is none: a hub id or a file)."""
    import json

    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def saved_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a folder's ``config.json`` says its model was saved in (``dtype``, or ``torch_dtype`` as
    transformers 4 wrote it); None where there is no such folder or field."""
    data = _config(folder)
    name = data.get("dtype") or data.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def gptq_kernel(folder: Path, device: torch.device | str) -> dict:
    """``from_pretrained`` arguments that make gptqmodel use a kernel taking a GPTQ folder's grid. On the CPU its
    automatic choice is ``TorchFusedLinear`` (torch's int4 matmul), which takes ``INT4_GROUPS`` only and fails
    at the first forward on a per-row grid (one group of ``in_features``) or another group size; its plain torch
    kernel (``gptq_torch``) takes every grid. Elsewhere, and for the groups the fused kernel takes: none."""
    from transformers import GPTQConfig

    qc = _config(folder).get("quantization_config") or {}
    if torch.device(device).type != "cpu" or qc.get("group_size") in INT4_GROUPS:
        return {}
    return {"quantization_config": GPTQConfig(bits=qc["bits"], backend="gptq_torch")}


def load(ref: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of an export folder (checked against its ``SHA256SUMS`` first) or a model reference;
    ``dtype`` of the unquantized tensors (None: the folder's own, ``saved_dtype``; float32 where it names none);
    ``device`` where it loads (gptqmodel picks its kernel for it).
    A ``gptq_lora`` folder needs gptqmodel (the ``gptq`` extra) and a kernel of it for this device and shape; its
    errors come through as they are (``ImportError``, or what gptqmodel raises)."""
    folder = Path(ref)
    what = kind(folder)
    dtype = dtype or saved_dtype(folder)
    if what == "gift":  # the registered quantizer checks the weights' sha256 and the folder's SHA256SUMS
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, device_map=str(device))
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    if folder.is_dir():
        require_sums(folder)  # an export copied here checks against its own SHA256SUMS
    if what == "gptq_lora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        given = {"dtype": dtype} if dtype else {}
        base = AutoModelForCausalLM.from_pretrained(folder, device_map=str(device), **given,
                                                    **gptq_kernel(folder, device))
        return PeftModel.from_pretrained(base, folder / "adapter").eval(), AutoTokenizer.from_pretrained(folder)
    model, tok = load_model(str(ref), dtype or torch.float32)
    return model.to(device), tok
