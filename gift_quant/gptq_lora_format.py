"""The ``gptq_lora`` export: a standard GPTQ checkpoint of every column plus a PEFT LoRA adapter that puts the
salient columns back exactly, for the tools that load GPTQ and LoRA but not our own format.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .checkpoint import base_state, symmetric
from .grid import QuantizedWeight

if TYPE_CHECKING:
    from .recipe import Recipe


def export_gptq_lora(model, tokenizer, results: dict[str, QuantizedWeight], out: Path,
                     dtype: torch.dtype = torch.float16, fmt: str = "gptq") -> None:
    """A standard GPTQ checkpoint (every column quantized; ``fmt`` v1 ``gptq`` or gptqmodel's ``gptq_v2``,
    ``desc_act`` where a layer has act-order groups) plus a PEFT LoRA adapter in ``out/adapter``
    that restores the salient columns exactly: ``A`` selects the salient inputs (one-hot rows),
    ``B = W_s - deq(W_s)``, ``lora_alpha = r`` (scaling 1), a rank per layer equal to its ``k``.

    The configs are the libraries' own objects written by their own ``save_pretrained``
    (``transformers.GPTQConfig`` in the model config, whose ``dtype`` says what to load the unquantized
    tensors as; ``peft.LoraConfig`` for the adapter), so they stay what those libraries read."""
    import copy

    from peft import LoraConfig
    from transformers import GPTQConfig

    from .pack import to_gptq

    bits = {qw.bits for qw in results.values()}
    groups = {qw.group_size for qw in results.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(f"a GPTQ checkpoint has one bit width and group size; got bits {bits}, groups {groups}")
    state = base_state(model, set(results))
    lora, ranks = {}, {}
    for name, qw in results.items():
        state.update({f"{name}.{k}": v for k, v in to_gptq(qw, fmt).items()})
        k = qw.salient_idx.numel()
        if k == 0:
            continue
        a = torch.zeros(k, qw.codes.shape[1])
        a[torch.arange(k), qw.salient_idx] = 1.0
        b = qw.salient_weight.float() - qw.dequantize_grid()[:, qw.salient_idx]
        lora[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.float16)
        lora[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.float16).contiguous()
        ranks[name] = k
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    desc_act = any(qw.g_idx is not None for qw in results.values())
    config.quantization_config = GPTQConfig(bits=bits.pop(), group_size=groups.pop(), desc_act=desc_act,
                                            sym=symmetric(results), checkpoint_format=fmt)
    config.dtype = dtype
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if ranks:
        r = max(ranks.values())
        LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                   target_modules=sorted({n.rsplit(".", 1)[-1] for n in ranks}), rank_pattern=ranks,
                   alpha_pattern=ranks, inference_mode=True).save_pretrained(out / "adapter")
        save_file({k: v.to(dtype) for k, v in lora.items()}, str(out / "adapter" / "adapter_model.safetensors"),
                  metadata={"format": "pt"})


def write(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """The export stage's entry: ``export_gptq_lora`` in ``export.dtype``."""
    export_gptq_lora(model, tokenizer, results, out, getattr(torch, recipe.export.dtype), fmt)
