"""The native ``gift`` checkpoint: GPTQ v1 packed codes of the non-salient grid plus the salient columns.

One ``model.safetensors`` and a ``config.json`` whose ``quantization_config`` (``quant_method: gift``)
lists every quantized layer's shape and ``k`` and the file's sha256. Both loaders, ``load`` here and
``from_pretrained`` through ``hf_quantizer``, check the same things with the functions below before
a tensor is used: the checksum, every tensor present with its shape and dtype, salient indices in
range and distinct, codes within their bits.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .checkpoint import (
    HEADER_DTYPES,
    CheckpointError,
    assign_state,
    base_state,
    check_g_idx,
    check_scales,
    folder_config,
    read_safetensors,
    symmetric,
)
from .checkpoint import packed_shapes as checkpoint_shapes
from .export_format import Format
from .grid import QuantizedWeight
from .integrity import require_sums, sha256
from .pack import FORMATS

if TYPE_CHECKING:
    from .recipe import Recipe

# dtype of each tensor of a ``gift`` layer (GPTQ v1 packing plus the salient columns)
GIFT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
               "salient_weight": torch.float16, "salient_idx": torch.int32}


def export_gift(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, extra_config: dict,
                fmt: str = "gptq") -> None:
    """The native compact folder: the GPTQ packed grid (``fmt``: v1 ``gptq`` or ``gptq_v2``, the format of an
    imported checkpoint, so its tensors stay bit-identical) plus ``salient_weight`` (fp16) and ``salient_idx``
    (int32) per layer; ``config.json`` carries ``quantization_config.quant_method = gift``.
    ``model`` supplies every other tensor (dense linears are skipped)."""
    from . import __version__
    from .pack import to_gptq

    state = base_state(model, set(results))
    layers = {}
    for name, qw in results.items():
        state.update({f"{name}.{k}": v for k, v in to_gptq(qw, fmt).items()})
        state[f"{name}.salient_weight"] = qw.salient_weight.to(torch.float16).contiguous()
        state[f"{name}.salient_idx"] = qw.salient_idx.to(torch.int32)
        layers[name] = {"k": qw.salient_idx.numel(), "in": qw.codes.shape[1], "out": qw.codes.shape[0]}
    bits, group = {qw.bits for qw in results.values()}, {qw.group_size for qw in results.values()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gift", "bits": bits.pop(), "group_size": group.pop(),
                                     "sym": symmetric(results), "checkpoint_format": fmt, "version": __version__,
                                     "layers": layers, "sha256": {"model.safetensors": sha256(out / "model.safetensors")},
                                     **extra_config}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(out)


def gift_config(path: Path, qc: dict | None) -> tuple[int, int]:
    """``(bits, group_size)`` of a ``gift`` folder's ``quantization_config``, checked."""
    qc = qc or {}
    if qc.get("quant_method") != "gift":
        raise CheckpointError(f"{path}/config.json: quantization_config.quant_method is {qc.get('quant_method')!r}, "
                              f"expected 'gift'; load other checkpoints with transformers")
    bits, group = qc.get("bits"), qc.get("group_size")
    if bits not in (2, 3, 4, 8):
        raise CheckpointError(f"{path}/config.json: quantization_config.bits = {bits}; expected 2, 3, 4 or 8")
    if group != -1 and (not isinstance(group, int) or group < 1):
        raise CheckpointError(f"{path}/config.json: quantization_config.group_size = {group}; expected -1 or > 0")
    if qc.get("checkpoint_format", "gptq") not in FORMATS:
        raise CheckpointError(f"{path}/config.json: quantization_config.checkpoint_format = "
                              f"{qc.get('checkpoint_format')!r}; expected one of {list(FORMATS)}")
    return bits, group


def check_gift_file(path: Path, qc: dict) -> None:
    """The ``gift`` folder's ``model.safetensors`` against the sha256 its config recorded (a truncated or
    damaged file is named here, before any loader reads it)."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    recorded = (qc.get("sha256") or {}).get("model.safetensors")
    if recorded is None:
        raise CheckpointError(f"{path}/config.json: quantization_config has no sha256 of model.safetensors; "
                              f"export it again with gift-quant (recover --from export)")
    if sha256(file) != recorded:
        raise CheckpointError(f"{file}: sha256 differs from the one in config.json; the file is damaged or truncated")
    require_sums(path)  # the folder's other files (config, tokenizer) against its SHA256SUMS


def expected_tensors(model, qc: dict) -> set[str]:
    """Every tensor name a ``gift`` file must hold for ``model`` (the model with its linears unreplaced)."""
    bits, group = qc["bits"], qc["group_size"]
    names = {f"{n}.{f}" for n, shape in qc["layers"].items() for f in packed_shapes(shape, bits, group)}
    for k in model.state_dict():
        module, _, leaf = k.rpartition(".")
        if module in qc["layers"]:
            if leaf == "bias":
                names.add(k)
            continue
        if not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)):
            names.add(k)
    return names


def check_dtype(path: Path, name: str, field: str, dtype: torch.dtype | str) -> None:
    """A ``gift`` layer tensor has the dtype of the format (``dtype``: torch's, or a safetensors header's)."""
    dtype = HEADER_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype != GIFT_DTYPES[field]:
        raise CheckpointError(f"{path}: tensor {name}.{field} is {dtype}, expected {GIFT_DTYPES[field]}")


def check_complete(path: Path, expected: set[str], present: set[str]) -> None:
    """Every tensor a ``gift`` folder must hold is in its file (no loader may re-initialise one)."""
    absent = sorted(expected - present)
    if absent:
        raise CheckpointError(f"{path}/model.safetensors: missing tensor {absent[0]}"
                              + (f" and {len(absent) - 1} more" if len(absent) > 1 else ""))


def verify_gift(path: Path) -> list[str]:
    """Problems of a ``gift`` folder (checksum, missing tensors, bad indices), one line each."""
    try:
        load(path)
    except (CheckpointError, OSError, ValueError) as e:
        return [str(e)]
    return []


def packed_shapes(shape: dict, bits: int, group: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's tensors in a ``gift`` folder (``shape``: its ``in``, ``out``, ``k``): GPTQ's packing
    and the salient columns."""
    n_in, n_out, k = shape["in"], shape["out"], shape["k"]
    return {**checkpoint_shapes(n_in, n_out, bits, group), "salient_weight": (n_out, k), "salient_idx": (k,)}


def salient_linear_from_packed(path: Path, name: str, tensors: dict[str, torch.Tensor], shape: dict, bits: int,
                               group: int, noise: str = "none", noise_bits: int = 4, fmt: str = "gptq",
                               dtype: torch.dtype = torch.float32):
    """One ``SalientLinear`` from its packed tensors (``tensors``: field -> tensor, ``bias`` optional),
    after checking every name and shape against ``config.json``. ``dtype``: the model's, what the layer merges
    into (``merge_to_dense``)."""
    from .layers import SalientLinear
    from .pack import from_gptq

    for field, want in packed_shapes(shape, bits, group).items():
        t = tensors.get(field)
        if t is None or t.is_meta:
            raise CheckpointError(f"{path}: missing tensor {name}.{field}")
        if tuple(t.shape) != want:
            raise CheckpointError(f"{path}: tensor {name}.{field} has shape {tuple(t.shape)}, expected {want} "
                                  f"for {bits}-bit, group {group} (config.json)")
        check_dtype(path, name, field, t.dtype)
    idx = tensors["salient_idx"].long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape["in"]):
        raise CheckpointError(f"{path}: tensor {name}.salient_idx holds column indices outside 0..{shape['in'] - 1}")
    if idx.unique().numel() != idx.numel():
        raise CheckpointError(f"{path}: tensor {name}.salient_idx repeats a column")
    check_g_idx(path, name, tensors["g_idx"], shape["in"], tensors["scales"].shape[0])
    check_scales(path, f"{name}.scales", tensors["scales"].float())
    qw = replace(from_gptq(tensors, bits, group, shape["in"], shape["out"], fmt),
                 salient_idx=idx, salient_weight=tensors["salient_weight"].float())
    bias = tensors.get("bias")
    return SalientLinear.from_quantized(qw, None if bias is None else bias.float(), noise, noise_bits, dtype)


def load(path: str | Path, noise: str = "none", noise_bits: int = 4, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a native ``gift`` folder, with ``SalientLinear`` layers (trainable again).

    ``noise``/``noise_bits``: the noise of a further GIFT-SW fine-tuning (``none`` for inference). ``dtype``: of
    every unquantized tensor, and what the layers merge into.
    Every tensor name, shape and dtype is checked against ``config.json`` before use. After
    ``import gift_quant``, ``AutoModelForCausalLM.from_pretrained(path)`` gives the same model
    (see ``gift_quant.hf_quantizer``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .layers import replace_linears

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    bits, group = gift_config(path, qc)
    check_gift_file(path, qc)
    tensors, _ = read_safetensors(path / "model.safetensors")
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    check_complete(path, expected_tensors(model, qc), set(tensors))
    layers = {}
    for name, shape in qc["layers"].items():
        fields = {f: tensors.pop(f"{name}.{f}") for f in (*packed_shapes(shape, bits, group), "bias")
                  if f"{name}.{f}" in tensors}
        layers[name] = salient_linear_from_packed(path, name, fields, shape, bits, group, noise, noise_bits,
                                                  qc.get("checkpoint_format", "gptq"), dtype)
    replace_linears(model, {name: lambda _old, lin=lin: lin for name, lin in layers.items()})
    assign_state(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, path,
                 frozenset(layers))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def write(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, recipe: Recipe, fmt: str) -> None:
    """The export stage's entry: ``export_gift`` with the recipe's saliency and grid in the config."""
    extra = {"saliency": recipe.saliency.model_dump(mode="json"), "quant": recipe.quant.model_dump(mode="json")}
    export_gift(model, tokenizer, results, out, extra, fmt)


def is_gift_folder(folder: Path) -> bool:
    """Whether ``folder``'s config.json says ``quant_method: gift`` (an unreadable config is not one)."""
    try:
        qc = folder_config(folder).get("quantization_config") or {}
        return qc.get("quant_method") == "gift"
    except (CheckpointError, AttributeError):
        return False


def load_pretrained(folder: Path, dtype: torch.dtype | None, device: torch.device | str):
    """As a user loads it: ``from_pretrained`` through the registered quantizer (``hf_quantizer``), which checks the
    weights' sha256 and the folder's ``SHA256SUMS``; float32 where no dtype is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, device_map=str(device))
    return model.eval(), AutoTokenizer.from_pretrained(folder)


LOAD = ("```python\nimport gift_quant  # registers quant_method \"gift\" with transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{path}\")\n```")

FORMAT = Format("gift", "codes + salient columns", write, load_pretrained, is_gift_folder, LOAD, score_rank=0,
                verify=verify_gift)
