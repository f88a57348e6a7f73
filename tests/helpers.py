"""Helpers of the tests (imported by them; conftest holds fixtures only where it can)."""
import json
import os
import subprocess
import sys
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


def measured(code: str, **kwargs):
    """The JSON printed last by ``code`` run in a fresh Python on one thread, glibc's mmap threshold pinned so that
    its RSS follows the live tensors (what ``devices.peak`` reads on the CPU)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}, **kwargs)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
