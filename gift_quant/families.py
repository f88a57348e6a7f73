"""The model families gift-quant runs, one entry of data each (GPTQModel's ``models/definitions``, EfficientQAT's
``model_adapters``).

An entry says which ``model_type``s of a transformers config it covers, the linears of a decoder block a recipe
may target (``saliency.targets``), where the decoder blocks live, what in it differs from Llama that the pipeline
must respect (``special``: said, and each tested whole in ``tests/test_families.py``), and the few config fields
of a tiny random model of the family that the tests build from it.

What the pipeline reads from here: the block list (``decoder_layers``), the projection names (recipe validation,
``checks.check_targets``) and the model types it supports (a config of any other is refused before weights load).
What it reads from the config itself, because transformers states it there for every family: ``layer_types``,
the attention kind of each block (sliding window or full), whose masks and rotary embeddings differ
(``calibrate.block_inputs`` captures one set of block arguments a kind).

A new family is one entry here and a recipe; ``tests/test_families.py`` then runs it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# the size of every tiny test model (two blocks, four heads of 16, two key/value heads); ``Family.tiny`` adds to it
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    projections: tuple[str, ...] = LLAMA_PROJECTIONS
    blocks: str = "model.layers"  # the decoder block list, from the ``*ForCausalLM`` model
    special: tuple[str, ...] = ()
    hub: tuple[str, ...] = ()  # models of the family the shipped recipes name (recipes/)
    tiny: dict = field(default_factory=dict)  # config fields of the tiny test model beyond ``TINY``

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder blocks."""
        return model.get_submodule(self.blocks)

    def tiny_config(self, vocab_size: int):
        """The config of a tiny random model of the family (its first model type) with ``vocab_size`` tokens."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_types[0], **{**TINY, **self.tiny, "vocab_size": vocab_size})


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), special=("Llama 2 / 3 and SmolLM2; small models tie the embeddings",),
           hub=("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Meta-Llama-3-8B"),
           tiny={"tie_word_embeddings": True}),
    Family("mistral", ("mistral",), special=("a sliding window on every block (Mistral 7B v0.1: 4096 tokens)",),
           hub=("mistralai/Mistral-7B-v0.3",),
           tiny={"sliding_window": 16}),
    Family("qwen2", ("qwen2",), special=("biases on q_proj, k_proj and v_proj (kept in full precision)",),
           hub=("Qwen/Qwen2.5-7B",),
           tiny={"tie_word_embeddings": True}),
    Family("qwen3", ("qwen3",), special=("q_norm and k_norm on every head (RMSNorm before the rotary embedding)",),
           hub=("Qwen/Qwen3-8B-Base",)),
    Family("gemma2", ("gemma2",),
           special=("attention and final logits softcapped (tanh)", "sliding-window and full blocks alternate",
                    "four norms a block; embeddings scaled by sqrt(hidden); tied embeddings; 256k vocabulary"),
           hub=("google/gemma-2-9b",),
           tiny={"sliding_window": 16, "query_pre_attn_scalar": 16}),
    Family("gemma3", ("gemma3_text",),
           special=("five sliding-window blocks to one full, each kind with its own rotary base",
                    "q_norm and k_norm; four norms a block; tied embeddings; 262k vocabulary"),
           hub=("google/gemma-3-1b-pt",),
           tiny={"sliding_window": 16, "query_pre_attn_scalar": 16,
                 "layer_types": ["sliding_attention", "full_attention"]}),
    Family("phi3", ("phi3",), projections=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           special=("q, k and v fused in qkv_proj, gate and up in gate_up_proj (salient columns are inputs: each "
                    "fused linear keeps its own)",),
           hub=("microsoft/Phi-3-mini-4k-instruct",), tiny={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
)

MODEL_TYPES = {t: f for f in FAMILIES for t in f.model_types}
PROJECTIONS = sorted({p for f in FAMILIES for p in f.projections})  # every name a recipe may target


class UnsupportedModel(ValueError):
    pass


def family_of(config) -> Family:
    """The family of a transformers config (or of a model: its ``config``), refused by name where there is none."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UnsupportedModel(f"model_type {model_type!r} is not a family gift-quant knows; supported: "
                               f"{', '.join(sorted(MODEL_TYPES))} (a new family is one entry in "
                               f"gift_quant/families.py)")
    return MODEL_TYPES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model of a known family."""
    return family_of(model).decoder_layers(model)


def layer_types(model: nn.Module) -> list[str]:
    """The attention kind of each decoder block (``config.layer_types``: ``sliding_attention`` or
    ``full_attention``); every block ``full_attention`` where the config does not say."""
    n = len(decoder_layers(model))
    return list(getattr(model.config, "layer_types", None) or ["full_attention"] * n)
