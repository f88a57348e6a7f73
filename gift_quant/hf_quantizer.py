"""``AutoModelForCausalLM.from_pretrained(gift_folder)`` through transformers' public quantizer registry.

``import gift_quant`` registers ``quant_method: gift`` with ``register_quantization_config`` and
``register_quantizer`` (no private internals patched), as soon as transformers' quantizer registry is
imported (see ``gift_quant/__init__``); this module imports from the registry's own submodules because
it may run while ``transformers.quantizers`` is still initialising. Loading then goes the usual transformers way:
before the weights are read every quantized linear named in ``quantization_config.layers`` becomes
a ``PackedSalientLinear`` whose buffers carry the checkpoint's tensor names, so transformers' own
loader fills them (device map, dtype, sharding and all); afterwards each one is turned into the
trainable ``SalientLinear`` by the same checked function ``gift_quant.load`` uses.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import CheckpointError
from .gift_format import (
    GIFT_DTYPES,
    check_complete,
    check_dtype,
    check_gift_file,
    expected_tensors,
    gift_config,
    packed_shapes,
    salient_linear_from_packed,
)
from .layers import replace_linears


@register_quantization_config("gift")
class GiftConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a ``gift`` folder, kept as written (``layers``: in/out/k per layer)."""

    def __init__(self, bits: int, group_size: int, layers: dict[str, dict], **extra: Any):
        self.quant_method = "gift"
        self.bits, self.group_size, self.layers = bits, group_size, layers
        for key, value in extra.items():
            setattr(self, key, value)
        gift_config("<quantization_config>", self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class PackedSalientLinear(nn.Module):
    """Placeholder that only holds one layer's checkpoint tensors until loading is done."""

    def __init__(self, shape: dict, bits: int, group: int, bias: bool):
        super().__init__()
        for field, size in packed_shapes(shape, bits, group).items():
            self.register_buffer(field, torch.zeros(size, dtype=GIFT_DTYPES[field]))
        self.bias = nn.Parameter(torch.zeros(shape["out"]), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a gift layer was used before its weights were loaded")


@register_quantizer("gift")
class GiftHfQuantizer(HfQuantizer):
    """Loads ``gift`` folders (pre-quantized only: quantizing goes through ``gift-quant recover``)."""

    requires_calibration = True
    quantization_config: GiftConfig

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        qc = self.quantization_config
        self._path = getattr(model.config, "_name_or_path", "<gift folder>")
        check_gift_file(self._path, qc.to_dict())
        self._expected = expected_tensors(model, qc.to_dict())
        have = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [n for n in qc.layers if n not in have]
        if unknown:
            raise CheckpointError(f"{self._path}/config.json: quantization_config.layers names {unknown[0]}, "
                                  f"which is not a linear layer of the model of config.json")
        replace_linears(model, {name: lambda old, shape=shape: PackedSalientLinear(
            shape, qc.bits, qc.group_size, old.bias is not None) for name, shape in qc.layers.items()})

    def _process_model_after_weight_loading(self, model, **kwargs) -> None:
        from safetensors import safe_open

        qc = self.quantization_config
        # transformers re-initialises what is absent and casts what has another dtype: the file decides here
        with safe_open(f"{self._path}/model.safetensors", "pt") as f:
            check_complete(self._path, self._expected, set(f.keys()))
            for name in qc.layers:
                for field in GIFT_DTYPES:
                    check_dtype(self._path, name, field, f.get_slice(f"{name}.{field}").get_dtype())
        layers, dtype = {}, model.get_input_embeddings().weight.dtype  # the dtype the model was loaded in
        for name, shape in qc.layers.items():
            packed = model.get_submodule(name)
            fields = dict(packed.named_buffers())
            for field, t in fields.items():  # transformers flags what it read; a mismatch is only logged
                if not getattr(t, "_is_hf_initialized", False):
                    raise CheckpointError(f"{self._path}: tensor {name}.{field} is missing or does not have the "
                                          f"shape {tuple(t.shape)} that config.json implies (see the load report above)")
            if packed.bias is not None:
                fields["bias"] = packed.bias
            layers[name] = salient_linear_from_packed(self._path, name, fields, shape, qc.bits, qc.group_size,
                                                      fmt=getattr(qc, "checkpoint_format", "gptq"), dtype=dtype)
        replace_linears(model, {name: lambda _old, lin=lin: lin for name, lin in layers.items()})

    def is_serializable(self) -> bool:
        return False  # save with gift_quant (export_gift), which packs the trained columns again

    @property
    def is_trainable(self) -> bool:
        return True
