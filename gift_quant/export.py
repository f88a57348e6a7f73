"""The run's quantized layers on disk, the GPTQ v1 + LoRA exporter, and what exports cost in bits.

``save_quantized`` / ``load_quantized`` keep every ``QuantizedWeight`` of a run (codes as uint8,
not yet bit-packed) in one safetensors file; shapes and dtypes are checked on load and a missing
or malformed tensor is named in the error. The native ``gift`` format is ``gift_format``.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .quantize import QuantizedWeight

_FIELDS = ("codes", "scale", "zero", "salient_idx", "salient_weight")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or does not match its description."""


def save_quantized(results: dict[str, QuantizedWeight], path: Path) -> None:
    tensors, meta = {}, {}
    for name, qw in results.items():
        for f in _FIELDS:
            tensors[f"{name}.{f}"] = getattr(qw, f).contiguous()
        if qw.g_idx is not None:
            tensors[f"{name}.g_idx"] = qw.g_idx.contiguous()
        meta[name] = {"bits": qw.bits, "group_size": qw.group_size}
    save_file(tensors, str(path), metadata={"layers": json.dumps(meta)})


REDO_STAGE = "rerun the stage that wrote it"
COPY_AGAIN = "the file is damaged: download or copy the checkpoint again"


@contextmanager
def _opened(path: Path, fix: str):
    """``safe_open(path)``, its errors (truncated file, a header whose shapes its bytes do not hold, an unreadable
    file) as one ``CheckpointError`` naming the file and ``fix`` (what to do)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); it is corrupt or truncated: "
                              f"{fix}") from None


def read_safetensors(path: Path, keep=None, fix: str = REDO_STAGE) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a safetensors file whose names ``keep(name)`` accepts (default: all) and its metadata."""
    with _opened(path, fix) as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}, f.metadata() or {}


def safetensors_keys(path: Path, fix: str = REDO_STAGE) -> list[str]:
    """The tensor names of a safetensors file, from its header (checked against the file's size; no tensor read)."""
    with _opened(path, fix) as f:
        return list(f.keys())


def check_scales(where: Path | str, name: str, scales: torch.Tensor) -> None:
    """Grid scales must be finite and positive: a NaN or a zero step would otherwise surface hours later as a
    NaN loss or perplexity."""
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bad.any():
        value = scales[bad].flatten()[0].item()
        raise CheckpointError(f"{where}: tensor {name} holds {int(bad.sum())} scale(s) that are not finite and "
                              f"positive (first: {value}); the checkpoint is damaged or was written wrongly")


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path,
                 replaced: frozenset[str] = frozenset()) -> None:
    """Load ``state`` into a model built on the meta device (``assign=True``) and refuse any tensor the
    model's config does not account for. Parameters of the ``replaced`` layers (already built from the
    checkpoint's packed tensors) and a tied ``lm_head.weight`` may be absent from ``state``."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if m.rpartition(".")[0].removesuffix(".base") not in replaced
               and not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match the model of config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()


def load_quantized(path: Path) -> dict[str, QuantizedWeight]:
    tensors, meta = read_safetensors(Path(path))
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
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is not None:
            g_idx = check_g_idx(path, name, g_idx, in_f, t["scale"].shape[1])
        out[name] = QuantizedWeight(bits=m["bits"], group_size=m["group_size"], g_idx=g_idx, **t)
    return out


def check_g_idx(path: Path, name: str, g_idx: torch.Tensor, in_features: int, n_groups: int) -> torch.Tensor:
    """A layer's ``g_idx`` (group of each input column) as int64, after checking its shape and range."""
    if tuple(g_idx.shape) != (in_features,):
        raise CheckpointError(f"{path}: tensor {name}.g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise CheckpointError(f"{path}: tensor {name}.g_idx holds groups outside 0..{n_groups - 1}")
    return g_idx.long()


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


def symmetric(results: dict[str, QuantizedWeight]) -> bool:
    """Whether every zero point is the symmetric grid's ``2^(bits-1)``."""
    return all(bool((qw.zero == 2 ** (qw.bits - 1)).all()) for qw in results.values())


def base_state(model, quantized: set[str]) -> dict[str, torch.Tensor]:
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
