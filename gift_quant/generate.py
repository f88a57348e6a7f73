"""Training text without a corpus: sequences sampled from the full-precision model itself (LLM-QAT).

Each sequence starts from one token drawn uniformly from the vocabulary (special tokens excluded), then the
model samples the rest at ``temperature`` / ``top_p`` (no top-k), the end-of-sequence token suppressed so
that every sequence is exactly ``seq_len`` tokens. Why: the quantized model then trains on the distribution it
must reproduce, as much of it as the run wants, with no text to license or ship; LLM-QAT found such text as
good as real data for recovery.

Batch ``j`` is seeded by ``(seed, j)`` alone, so the text of a seed does not depend on how a run was split
into resumed parts; each finished batch waits in ``generate.work/`` (``rundir.save_piece``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .recipe import GenerateSpec
from .rundir import load_piece, save_piece


def first_tokens(vocab_size: int, special: list[int], n: int, seed: int) -> torch.Tensor:
    """``n`` token ids drawn uniformly from the vocabulary without the special ones, ``(n, 1)``."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special if i < vocab_size]] = False
    ids = allowed.nonzero().squeeze(1)
    return ids[torch.randint(0, len(ids), (n, 1), generator=torch.Generator().manual_seed(seed))]


@torch.no_grad()
def sample_batch(model: nn.Module, first: torch.Tensor, spec: GenerateSpec, seed: int, eos: list[int]) -> torch.Tensor:
    """One batch of sequences continued from ``first`` to ``spec.seq_len`` tokens by sampling."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                              max_new_tokens=spec.seq_len - 1, min_new_tokens=spec.seq_len - 1,
                              eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = model.generate(first.to(device), attention_mask=torch.ones_like(first, device=device),
                             generation_config=config)
    return out[:, :spec.seq_len].cpu()


def generate_texts(model: nn.Module, tokenizer, spec: GenerateSpec, seed: int, work: Path, key: str) -> torch.Tensor:
    """``ceil(spec.tokens / spec.seq_len)`` sequences of ``spec.seq_len`` tokens, ``(n, seq_len)``; batches already
    in ``work`` (of this ``key``) are reused."""
    work.mkdir(parents=True, exist_ok=True)
    n = math.ceil(spec.tokens / spec.seq_len)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = model.get_output_embeddings().out_features
    model.eval()
    out = []
    for j in tqdm(range(math.ceil(n / spec.batch_size)), desc="generate", unit="batch"):
        size = min(spec.batch_size, n - j * spec.batch_size)
        path = work / f"batch-{j:05d}.safetensors"
        done = load_piece(path, key, "generate")
        if done is None:
            s = seed * 1000003 + j
            ids = sample_batch(model, first_tokens(vocab, tokenizer.all_special_ids, size, s), spec, s, eos)
            save_piece(path, {"ids": ids.contiguous()}, key)
            done = ({"ids": ids}, {})
        out.append(done[0]["ids"])
    return torch.cat(out)
