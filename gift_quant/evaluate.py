"""Perplexity as the quantization literature reports it (METHOD section 5).

The whole text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens; the
perplexity is ``exp`` of the mean next-token NLL over all predicted tokens of all windows (every
window predicts ``seq_len - 1`` tokens). lm-eval's ``wikitext`` task reports word perplexity, a
different number.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def nonoverlapping_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``(n, seq_len)`` consecutive windows; the incomplete tail is dropped."""
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text of {tokens.numel()} tokens is shorter than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """``exp(mean NLL)`` of ``model`` over ``windows`` (n, seq_len)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        ids = windows[b : b + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
