"""Helpers of the tests (imported by them; conftest holds fixtures only where it can)."""
from pathlib import Path

import torch


def family_folder(family, folder: Path, seed: int = 0) -> Path:
    """A tiny random model of ``family`` (``families.Family.tiny_config``) with SmolLM2's tokenizer, saved to
    ``folder`` in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant.sources import SMOLLM2, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(family.tiny_config(len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
