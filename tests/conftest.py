"""Shared fixtures: a tiny Llama built from a config, and the real SmolLM2-135M-Instruct (offline)."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gift_quant.sources import C4, SMOLLM2, WIKI  # noqa: E402,F401 (re-exported to the tests)

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


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    from gift_quant.sources import resolve_model

    folder = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    tiny_llama(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def recipe(folder, out, formats=("dense", "gift", "gptq_lora"), **train):
    data = {
        "name": "tiny", "model": {"ref": str(folder)}, "output_dir": str(out),
        "calibration": {"n_samples": 4, "seq_len": 64, "batch_size": 2},
        "saliency": {"k": 4, "k_overrides": {"down_proj": 8}},
        "quant": {"bits": 3},
        "train": {"steps": 4, "micro_batch_size": 2, "seq_len": 64, "checkpoint_every": 2, "lr": 1e-3, **train},
        "eval": {"ppl_seq_len": 64, "ppl_max_windows": 4, "batch_size": 2, "tasks": ["gq_piqa"], "limit": 2},
        "export": {"formats": list(formats)},
    }
    from gift_quant.recipe_file import parse_recipe

    return parse_recipe(data, "test")


def tweak(r, **changes):
    """``r`` with fields changed by dotted path (``tweak(r, **{"saliency.metric": "quik"})``), validated again;
    fields left unset stay unset (an imported checkpoint's grid is taken where the recipe does not set one)."""
    from gift_quant.recipe_file import parse_recipe

    data = r.model_dump(mode="json", exclude_unset=True)
    for path, value in changes.items():
        *sections, key = path.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return parse_recipe(data, "test")


def crash_at(step: int, error: BaseException):
    """An ``on_step`` callback that raises ``error`` once training reaches ``step`` (a kill mid-run)."""
    def on_step(now: int, _loss: float) -> None:
        if now == step:
            raise error

    return on_step


@pytest.fixture
def no_weights(monkeypatch):
    """Fail a test that loads model weights or a GPTQ checkpoint's tensors: the checks must come first."""
    from gift_quant import gptq_checkpoint, rundir

    def refuse(*_a, **_k):
        pytest.fail("weights were loaded before the inputs were checked")

    monkeypatch.setattr(rundir, "load_model", refuse)
    monkeypatch.setattr(gptq_checkpoint, "load", refuse)


def rewrite_gift(folder: Path, edit) -> None:
    """Apply ``edit`` to a gift folder's tensors and record the new file's sha256 in its config and SHA256SUMS (a
    consistent folder: what a writer with a bug would leave, which only the content checks catch)."""
    import json

    from safetensors.torch import load_file, save_file

    from gift_quant.integrity import SUMS, sha256, write_sums

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["sha256"]["model.safetensors"] = sha256(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    if (folder / SUMS).exists():
        write_sums(folder)
