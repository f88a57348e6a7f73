"""The ``gptq_lora`` export: a standard GPTQ checkpoint of every column plus a PEFT LoRA adapter that puts the
salient columns back exactly, for the tools that load GPTQ and LoRA but not our format (transformers + gptqmodel +
peft). ``gptq4_lora_format`` writes the same shape of folder for vLLM.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .checkpoint import base_state, folder_config, symmetric
from .export_format import Format
from .grid import QuantizedWeight
from .integrity import require_sums
from .kernels import INT4_GROUPS

if TYPE_CHECKING:
    from .recipe import Recipe


def export_gptq_lora(model, tokenizer, results: dict[str, QuantizedWeight], out: Path,
                     dtype: torch.dtype = torch.float16, fmt: str = "gptq", one_rank: bool = False) -> None:
    """A standard GPTQ checkpoint (every column quantized; ``fmt`` v1 ``gptq`` or gptqmodel's ``gptq_v2``,
    ``desc_act`` where a layer has act-order groups) plus a PEFT LoRA adapter in ``out/adapter``
    that restores the salient columns exactly: ``A`` selects the salient inputs (one-hot rows),
    ``B = W_s - deq(W_s)``, scaling 1; a rank per layer equal to its ``k`` (PEFT's ``rank_pattern``), or with
    ``one_rank`` every layer's factors zero-padded to the largest ``k`` (for readers without ``rank_pattern``).

    The configs are the libraries' own objects written by their own ``save_pretrained``
    (``transformers.GPTQConfig`` in the model config, whose ``dtype`` says what to load the unquantized
    tensors as; ``peft.LoraConfig`` for the adapter), so they stay what those libraries read."""
    import copy

    from transformers import GPTQConfig

    from .pack import to_gptq

    bits = {qw.bits for qw in results.values()}
    groups = {qw.group_size for qw in results.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(f"a GPTQ checkpoint has one bit width and group size; got bits {bits}, groups {groups}")
    state = base_state(model, set(results))
    for name, qw in results.items():
        state.update({f"{name}.{k}": v for k, v in to_gptq(qw, fmt).items()})
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
    _write_adapter(results, out / "adapter", dtype, one_rank)


def _write_adapter(results: dict[str, QuantizedWeight], out: Path, dtype: torch.dtype, one_rank: bool) -> None:
    """The salient columns as LoRA factors (nothing where no layer has any)."""
    from peft import LoraConfig

    ranks = {name: qw.salient_idx.numel() for name, qw in results.items() if qw.salient_idx.numel()}
    if not ranks:
        return
    r, lora = max(ranks.values()), {}
    for name in ranks:
        qw = results[name]
        k = r if one_rank else ranks[name]
        a = torch.zeros(k, qw.codes.shape[1])
        a[torch.arange(ranks[name]), qw.salient_idx] = 1.0
        b = torch.zeros(qw.codes.shape[0], k)
        b[:, : ranks[name]] = qw.salient_weight.float() - qw.dequantize_grid()[:, qw.salient_idx]
        lora[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype)
        lora[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype)
    patterns = {} if one_rank else {"rank_pattern": ranks, "alpha_pattern": ranks}
    LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
               target_modules=sorted({n.rsplit(".", 1)[-1] for n in ranks}), inference_mode=True,
               **patterns).save_pretrained(out)
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def write(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """The export stage's entry: ``export_gptq_lora`` in ``export.dtype``."""
    export_gptq_lora(model, tokenizer, results, out, getattr(torch, recipe.export.dtype), fmt)


def gptq_kernel(folder: Path, device: torch.device | str) -> dict:
    """``from_pretrained`` arguments that make gptqmodel use a kernel taking a GPTQ folder's grid. On the CPU its
    automatic choice is torch's int4 matmul, which takes ``INT4_GROUPS`` only, whole groups only (every layer's
    inputs a multiple of the group size: SmolLM2's 576 is not one of 128) and outputs in sixteens, and fails at the
    first forward otherwise; its plain torch kernel (``gptq_torch``) takes every grid. Elsewhere, and for the
    grids the int4 matmul takes: none."""
    from safetensors import safe_open
    from transformers import GPTQConfig

    qc = folder_config(folder).get("quantization_config") or {}
    if torch.device(device).type != "cpu":
        return {}
    bits, group = qc["bits"], qc.get("group_size")
    if group in INT4_GROUPS:
        shapes = []
        for f in Path(folder).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                shapes += [st.get_slice(k).get_shape() for k in st.keys() if k.endswith(".qweight")]
        if all((rows * 32 // bits) % group == 0 and out % 16 == 0 for rows, out in shapes):
            return {}
    return {"quantization_config": GPTQConfig(bits=bits, backend="gptq_torch")}


def load(folder: Path, dtype: torch.dtype | None, device: torch.device | str):
    """transformers + gptqmodel for the checkpoint (a kernel for this device and grid: ``gptq_kernel``), peft for the
    adapter, after the folder's ``SHA256SUMS``. Needs gptqmodel (the ``gptq`` extra); its errors come through as they
    are (``ImportError``, or what gptqmodel raises)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_sums(folder)
    given = {"dtype": dtype} if dtype else {}
    base = AutoModelForCausalLM.from_pretrained(folder, device_map=str(device), **given, **gptq_kernel(folder, device))
    return PeftModel.from_pretrained(base, folder / "adapter").eval(), AutoTokenizer.from_pretrained(folder)


def has_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter" / "adapter_config.json").is_file()


LOAD = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM  # GPTQ through gptqmodel\n"
        "base = AutoModelForCausalLM.from_pretrained(\"{path}\", device_map=\"auto\")\n"
        "model = PeftModel.from_pretrained(base, \"{path}/adapter\")\n```")

FORMAT = Format("gptq_lora", "GPTQ v1 + PEFT adapter", write, load, has_adapter, LOAD, score_rank=2, needs_kernel=True)
