"""An existing GPTQ checkpoint as the pipeline's input: read, checked, never re-quantized.

A folder (or hub id) whose ``config.json`` has ``quantization_config.quant_method: gptq`` in the v1
(``gptq``, auto-gptq's) or v2 (``gptq_v2``, gptqmodel's) layout, any of 2/3/4/8 bits, per-row or
grouped, symmetric or not, with or without act-order (``desc_act``: then ``g_idx`` scatters the
groups over the columns). Its packed tensors become the project's ``QuantizedWeight`` (codes, scales,
zeros, ``g_idx``) exactly, so training works on the user's own grid and the exports write the same
packed tensors back.

Everything here is checked against ``config.json`` before a tensor is used: the format, the bits, the
group size, each tensor's shape and dtype, ``g_idx`` in range; a mismatch names the tensor, what the
config implies and what the file holds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    COPY_AGAIN,
    CheckpointError,
    assign_state,
    check_g_idx,
    check_scales,
    packed_shapes,
    read_json,
    read_safetensors,
    safetensors_keys,
)
from .grid import QuantizedWeight
from .pack import FORMATS, from_gptq
from .sources import SourceError, local_or_package, safetensors_files, unreachable

log = logging.getLogger(__name__)

_DTYPES = {"qweight": (torch.int32,), "qzeros": (torch.int32,), "g_idx": (torch.int32, torch.int64),
           "scales": (torch.float16, torch.bfloat16, torch.float32)}


@dataclass(frozen=True)
class GPTQCheckpoint:
    """What a GPTQ checkpoint's ``quantization_config`` says, checked."""

    folder: Path
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    fmt: str  # checkpoint_format: gptq (v1) or gptq_v2


def folder_of(ref: str) -> Path:
    """The local folder of a model reference (a hub id is fetched, or found in the cache when offline)."""
    path = local_or_package(ref)
    if path is not None:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 (offline and not cached, a wrong id, no network)
        raise SourceError(unreachable("model.ref", ref, e)) from None


@lru_cache(maxsize=16)
def quant_method(ref: str) -> str | None:
    """``quantization_config.quant_method`` of a model folder (None: not a folder with a quantized config, a
    ``.gguf`` or package file, or a reference that does not resolve, which the input checks report).
    Hub ids are read from the local cache only, never fetched here."""
    try:
        path = local_or_package(ref)
    except SourceError:
        return None
    if path is None:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(ref, "config.json")
        except ValueError:  # not a valid hub id either
            return None
        path = Path(cached).parent if isinstance(cached, str) else None
    if path is None or not (path / "config.json").is_file():
        return None
    qc = read_json(path / "config.json", COPY_AGAIN).get("quantization_config") or {}
    return qc.get("quant_method")


def read_config(ref: str) -> GPTQCheckpoint:
    """The checked ``quantization_config`` of a GPTQ checkpoint."""
    folder = folder_of(ref)
    where = f"{folder}/config.json"
    qc = read_json(folder / "config.json", COPY_AGAIN).get("quantization_config") or {}
    if qc.get("quant_method") != "gptq":
        raise CheckpointError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'gptq'")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    problems = []
    if fmt not in FORMATS:
        problems.append(f"checkpoint_format = {fmt!r}: expected one of {list(FORMATS)} (other layouts, such as "
                        f"marlin or awq, are kernels' repackings: save the model in gptq format first)")
    if qc.get("bits") not in (2, 3, 4, 8):
        problems.append(f"bits = {qc.get('bits')!r}: the GPTQ format holds 2, 3, 4 or 8")
    group = qc.get("group_size", -1)
    if group != -1 and (not isinstance(group, int) or group < 1):
        problems.append(f"group_size = {group!r}: expected -1 (per row) or a positive number of columns")
    if qc.get("pack_dtype", "int32") != "int32":
        problems.append(f"pack_dtype = {qc.get('pack_dtype')!r}: only int32 packing is read")
    if qc.get("dynamic"):
        problems.append("dynamic (per-module bits or group sizes) is set: only one grid for every layer is read")
    if qc.get("lm_head"):
        problems.append("lm_head = true: a quantized lm_head is not read (the salient columns are in the decoder)")
    if problems:
        raise CheckpointError(f"{where}: quantization_config." + "; ".join(problems))
    return GPTQCheckpoint(folder, qc["bits"], group, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)), fmt)


def tensor_names(folder: Path) -> set[str]:
    """Every tensor name in the checkpoint, from the safetensors headers (no tensor is read; a truncated
    shard or one whose header does not fit its bytes is named here)."""
    names: set[str] = set()
    for f in safetensors_files(folder):
        names.update(safetensors_keys(f, COPY_AGAIN))
    return names


def quantized_layers(folder: Path) -> list[str]:
    """Module names of the checkpoint's quantized linears (those with a ``qweight``)."""
    return sorted(n.removesuffix(".qweight") for n in tensor_names(folder) if n.endswith(".qweight"))


def _read(folder: Path, keep) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names ``keep(name)`` accepts (the others are not read)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        tensors.update(read_safetensors(f, keep, COPY_AGAIN)[0])
    return tensors


def check_all_scales(ck: GPTQCheckpoint) -> None:
    """Every quantized layer's ``scales`` finite and positive, read alone (small) before any calibration."""
    for key, t in sorted(_read(ck.folder, lambda k: k.endswith(".scales")).items()):
        check_scales(ck.folder, key, t.float())


def layer(ck: GPTQCheckpoint, name: str, tensors: dict[str, torch.Tensor], n_in: int, n_out: int) -> QuantizedWeight:
    """One layer's tensors as a ``QuantizedWeight`` (no salient columns), after checking each against the config."""
    where = ck.folder
    for field, want in packed_shapes(n_in, n_out, ck.bits, ck.group_size).items():
        t = tensors.get(f"{name}.{field}")
        if t is None:
            raise CheckpointError(f"{where}: missing tensor {name}.{field}")
        if tuple(t.shape) != want:
            raise CheckpointError(f"{where}: tensor {name}.{field} has shape {tuple(t.shape)}, but config.json "
                                  f"(bits {ck.bits}, group_size {ck.group_size}) implies {want} for a "
                                  f"{n_in}-input, {n_out}-output linear")
        if t.dtype not in _DTYPES[field]:
            raise CheckpointError(f"{where}: tensor {name}.{field} is {t.dtype}, expected one of {_DTYPES[field]}")
    fields = {f: tensors[f"{name}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")}
    check_g_idx(where, name, fields["g_idx"], n_in, fields["scales"].shape[0])
    check_scales(where, f"{name}.scales", fields["scales"].float())
    return from_gptq(fields, ck.bits, ck.group_size, n_in, n_out, ck.fmt)


def read_layers(ck: GPTQCheckpoint, model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantized layer of the checkpoint as a ``QuantizedWeight`` (no salient columns), shaped by the
    linear of the same name in ``model`` (which may be on the meta device); only these tensors are read."""
    modules = dict(model.named_modules())
    names = set(quantized_layers(ck.folder))
    for name in sorted(names):
        if not isinstance(modules.get(name), nn.Linear):
            raise CheckpointError(f"{ck.folder}: quantized tensor {name}.qweight belongs to no linear layer of the "
                                  f"{model.config.model_type} model that config.json describes")
    tensors = _read(ck.folder, lambda k: k.rpartition(".")[0] in names and k.rpartition(".")[2] in _DTYPES)
    return {name: layer(ck, name, tensors, modules[name].in_features, modules[name].out_features)
            for name in sorted(names)}


def load(ck: GPTQCheckpoint, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(model, tokenizer, layers)``: the checkpoint's model with plain ``nn.Linear`` layers holding the
    dequantized grid (what gptqmodel's kernels compute with), and every quantized layer as a
    ``QuantizedWeight`` without salient columns (``read_layers``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(ck.folder, trust_remote_code=trust_remote_code)
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    layers = read_layers(ck, model)
    packed = {f"{name}.{field}" for name in layers for field in _DTYPES}
    state = _read(ck.folder, lambda k: k not in packed)  # biases of quantized layers stay
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state.update({f"{name}.weight": qw.dequantize_grid().to(dtype) for name, qw in layers.items()})
    assign_state(model, state, ck.folder)
    log.info("imported %d GPTQ layers (%s, %d-bit, group %d%s) from %s", len(layers), ck.fmt, ck.bits,
             ck.group_size, ", act-order" if ck.desc_act else "", ck.folder)
    return model.eval(), AutoTokenizer.from_pretrained(ck.folder, trust_remote_code=trust_remote_code), layers
