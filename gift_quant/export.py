"""Writing and reading model outputs: quantized layers and dense checkpoints, atomically.

``save_quantized`` / ``load_quantized`` keep every ``QuantizedWeight`` of a run (codes as uint8,
not yet bit-packed) in one safetensors file; shapes and dtypes are checked on load and a missing
or malformed tensor is named in the error.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .integrity import sha256
from .quantize import QuantizedWeight

_FIELDS = ("codes", "scale", "zero", "salient_idx", "salient_weight")
# dtype of each tensor of a ``gift`` layer (GPTQ v1 packing plus the salient columns)
GIFT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
               "salient_weight": torch.float16, "salient_idx": torch.int32}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or does not match its description."""


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_quantized(results: dict[str, QuantizedWeight], path: Path) -> None:
    tensors, meta = {}, {}
    for name, qw in results.items():
        for f in _FIELDS:
            tensors[f"{name}.{f}"] = getattr(qw, f).contiguous()
        meta[name] = {"bits": qw.bits, "group_size": qw.group_size}
    save_file(tensors, str(path), metadata={"layers": json.dumps(meta)})


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); it is corrupt or truncated, "
                              f"rerun the stage that wrote it") from None


def load_quantized(path: Path) -> dict[str, QuantizedWeight]:
    tensors, meta = _read(Path(path))
    if "layers" not in meta:
        raise CheckpointError(f"{path}: no 'layers' metadata; not written by gift_quant.save_quantized")
    out = {}
    for name, m in json.loads(meta["layers"]).items():
        missing = [f"{name}.{f}" for f in _FIELDS if f"{name}.{f}" not in tensors]
        if missing:
            raise CheckpointError(f"{path}: missing tensor {missing[0]}")
        t = {f: tensors[f"{name}.{f}"] for f in _FIELDS}
        out_f, in_f = t["codes"].shape
        n_groups = 1 if m["group_size"] == -1 else -(-in_f // m["group_size"])
        expected = {"scale": (out_f, n_groups), "zero": (out_f, n_groups), "salient_weight": (out_f, t["salient_idx"].numel())}
        for f, shape in expected.items():
            if tuple(t[f].shape) != shape:
                raise CheckpointError(f"{path}: tensor {name}.{f} has shape {tuple(t[f].shape)}, expected {shape}")
        if t["codes"].dtype != torch.uint8 or int(t["codes"].max()) >= 2 ** m["bits"]:
            raise CheckpointError(f"{path}: tensor {name}.codes is not {m['bits']}-bit uint8 codes")
        out[name] = QuantizedWeight(bits=m["bits"], group_size=m["group_size"], **t)
    return out


def bits_per_weight(results: dict[str, QuantizedWeight]) -> float:
    """Storage of the quantized linears per weight (METHOD section 7): ``b``-bit codes of the
    non-salient columns, an fp16 scale and a ``b``-bit zero per row-group, fp16 salient columns
    and a 32-bit index per salient column."""
    bits = weights = 0
    for qw in results.values():
        out, n_in = qw.codes.shape
        k = qw.salient_idx.numel()
        n_groups = qw.scale.shape[1]
        bits += qw.bits * out * (n_in - k) + (16 + qw.bits) * out * n_groups + 16 * out * k + 32 * k
        weights += out * n_in
    return bits / weights


_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8,
                  "BOOL": torch.bool}
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "U8": 8, "I8": 8, "BOOL": 8}


def storage(folder: Path, layers: dict[str, tuple[int, int]]) -> dict:
    """Size on disk of an exported folder (every safetensors file, adapter included) and the bits per
    weight its tensors spend on the quantized linears ``layers`` (name -> (out, in)): packed codes,
    scales, zeros, ``g_idx``, salient columns and indices, LoRA factors, or plain dense weights.
    Read from the safetensors headers only."""
    from safetensors import safe_open

    linear_bits = total_bytes = 0
    for f in Path(folder).rglob("*.safetensors"):
        total_bytes += f.stat().st_size
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                module = key.removeprefix("base_model.model.")
                while module and module not in layers:
                    module = module.rpartition(".")[0]
                if module:
                    sl = st.get_slice(key)
                    linear_bits += _DTYPE_BITS[sl.get_dtype()] * math.prod(sl.get_shape())
    weights = sum(o * i for o, i in layers.values())
    return {"bytes": total_bytes, "linear_bits_per_weight": linear_bits / weights}


def _base_state(model, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` except the quantized linears' weights (tied lm_head left to the config)."""
    state = {}
    for k, v in model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if module in quantized and leaf != "bias":
            continue
        if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        state[k] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    return state


def export_gptq_lora(model, tokenizer, results: dict[str, QuantizedWeight], out: Path,
                     dtype: torch.dtype = torch.float16) -> None:
    """A standard GPTQ v1 checkpoint (every column quantized) plus a PEFT LoRA adapter in ``out/adapter``
    that restores the salient columns exactly: ``A`` selects the salient inputs (one-hot rows),
    ``B = W_s - deq(W_s)``, ``lora_alpha = r`` (scaling 1), a rank per layer equal to its ``k``.

    The configs are the libraries' own objects written by their own ``save_pretrained``
    (``transformers.GPTQConfig`` in the model config, whose ``dtype`` says what to load the unquantized
    tensors as; ``peft.LoraConfig`` for the adapter), so they stay what those libraries read."""
    import copy

    from peft import LoraConfig
    from transformers import GPTQConfig

    from .pack import to_gptq_v1

    bits = {qw.bits for qw in results.values()}
    groups = {qw.group_size for qw in results.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError(f"a GPTQ checkpoint has one bit width and group size; got bits {bits}, groups {groups}")
    state = _base_state(model, set(results))
    lora, ranks = {}, {}
    for name, qw in results.items():
        state.update({f"{name}.{k}": v for k, v in to_gptq_v1(qw).items()})
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
    config.quantization_config = GPTQConfig(bits=bits.pop(), group_size=groups.pop(), desc_act=False, sym=True,
                                            checkpoint_format="gptq")
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


def export_gift(model, tokenizer, results: dict[str, QuantizedWeight], out: Path, extra_config: dict) -> None:
    """The native compact folder: GPTQ v1 packed non-salient grid plus ``salient_weight`` (fp16) and
    ``salient_idx`` (int32) per layer; ``config.json`` carries ``quantization_config.quant_method = gift``.
    ``model`` supplies every other tensor (dense linears are skipped)."""
    from . import __version__
    from .pack import to_gptq_v1

    state = _base_state(model, set(results))
    layers = {}
    for name, qw in results.items():
        state.update({f"{name}.{k}": v for k, v in to_gptq_v1(qw).items()})
        state[f"{name}.salient_weight"] = qw.salient_weight.to(torch.float16).contiguous()
        state[f"{name}.salient_idx"] = qw.salient_idx.to(torch.int32)
        layers[name] = {"k": qw.salient_idx.numel(), "in": qw.codes.shape[1], "out": qw.codes.shape[0]}
    bits, group = {qw.bits for qw in results.values()}, {qw.group_size for qw in results.values()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gift", "bits": bits.pop(), "group_size": group.pop(),
                                     "sym": True, "checkpoint_format": "gptq", "version": __version__,
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
    dtype = _HEADER_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
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
    """Shapes of one layer's tensors in a ``gift`` folder (``shape``: its ``in``, ``out``, ``k``)."""
    n_in, n_out, k = shape["in"], shape["out"], shape["k"]
    n_groups = 1 if group == -1 else -(-n_in // group)
    return {"qweight": ((-(-n_in // 32)) * bits, n_out), "qzeros": (n_groups, (-(-n_out // 32)) * bits),
            "scales": (n_groups, n_out), "g_idx": (n_in,), "salient_weight": (n_out, k), "salient_idx": (k,)}


def salient_linear_from_packed(path: Path, name: str, tensors: dict[str, torch.Tensor], shape: dict, bits: int,
                               group: int, noise: str = "none", noise_bits: int = 4):
    """One ``SalientLinear`` from its packed tensors (``tensors``: field -> tensor, ``bias`` optional),
    after checking every name and shape against ``config.json``."""
    from .layers import SalientLinear
    from .pack import from_gptq_v1

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
    codes, scale, zero = from_gptq_v1(tensors, bits, shape["in"], shape["out"])
    if int(codes.max()) >= 2**bits:
        raise CheckpointError(f"{path}: tensor {name}.qweight holds codes above {bits} bits")
    qw = QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group,
                         salient_idx=tensors["salient_idx"].long(), salient_weight=tensors["salient_weight"].float())
    bias = tensors.get("bias")
    return SalientLinear.from_quantized(qw, None if bias is None else bias.float(), noise, noise_bits)


def load(path: str | Path, noise: str = "none", noise_bits: int = 4):
    """``(model, tokenizer)`` from a native ``gift`` folder, with ``SalientLinear`` layers (trainable again).

    ``noise``/``noise_bits``: the noise of a further GIFT-SW fine-tuning (``none`` for inference).
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
    tensors, _ = _read(path / "model.safetensors")
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    check_complete(path, expected_tensors(model, qc), set(tensors))
    layers = {}
    for name, shape in qc["layers"].items():
        fields = {f: tensors.pop(f"{name}.{f}") for f in (*packed_shapes(shape, bits, group), "bias")
                  if f"{name}.{f}" in tensors}
        layers[name] = salient_linear_from_packed(path, name, fields, shape, bits, group, noise, noise_bits)
    replace_linears(model, {name: lambda _old, lin=lin: lin for name, lin in layers.items()})
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False, assign=True)
    missing = [m for m in missing if m.rpartition(".")[0].removesuffix(".base") not in layers
               and not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model of config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(path)
