"""The recipe's texts as token tensors: calibration windows, training examples, evaluation windows.

Reading a text (files, packages, hub data sets) is ``sources``' job; this module only cuts the
tokens: random windows for calibration (seeded, so a rerun calibrates on the same tokens),
consecutive windows for perplexity and plain-text training, and chat conversations through the
tokenizer's template with labels on the assistant turns only; text the model generated (``generate``) is
cut into windows like plain text.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from .recipe import GENERATED
from .sources import SourceError, read_text, records, tokenize

if TYPE_CHECKING:
    from .recipe import Recipe


def nonoverlapping_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``(n, seq_len)`` consecutive windows; the incomplete tail is dropped."""
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text of {tokens.numel()} tokens is shorter than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def sample_windows(tokens: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens (seeded), shape ``(n, length)``."""
    if tokens.numel() <= length:
        raise SourceError(f"text has {tokens.numel()} tokens, fewer than one window of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (n,), generator=g)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def text_examples(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed plain text: consecutive windows, every token a label."""
    ids = nonoverlapping_windows(tokens, seq_len)
    return ids, ids.clone()


class ChatExamples:
    """Chat conversations as training rows of ``seq_len`` tokens, each templated and tokenized only when a step
    reads it: ``ids[idx]`` and ``labels[idx]`` (labels only on assistant turns, else -100) are what ``train`` takes.
    A data set of hundreds of thousands of conversations costs what the rows read cost, not its size: the records
    stay where ``sources.records`` reads them, and the last rows read are kept for the other half of the pair."""

    def __init__(self, tokenizer, conversations: Sequence[list[dict]], seq_len: int, keep: int = 256):
        self.tokenizer, self.conversations, self.seq_len = tokenizer, conversations, seq_len
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._row = functools.lru_cache(maxsize=keep)(self._tokenized)
        self.ids, self.labels = _Rows(self, 0), _Rows(self, 1)

    def __len__(self) -> int:
        return len(self.conversations)

    def _tokenized(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        msgs = self.conversations[i]
        ids = _template(self.tokenizer, msgs, generation_prompt=False)
        labels = [-100] * len(ids)
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(_template(self.tokenizer, msgs[:j], generation_prompt=True))
            end = len(_template(self.tokenizer, msgs[: j + 1], generation_prompt=False))
            labels[start:end] = ids[start:end]
        ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        fill = self.seq_len - len(ids)
        return torch.tensor(ids + [self.pad] * fill), torch.tensor(labels + [-100] * fill)


class _Rows:
    """``ids`` or ``labels`` of ``ChatExamples``: indexed by a tensor or list of rows, shaped like the tensor it
    stands for."""

    def __init__(self, examples: ChatExamples, which: int):
        self.examples, self.which = examples, which

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.examples), self.examples.seq_len

    def __getitem__(self, idx) -> torch.Tensor:
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        return torch.stack([self.examples._row(int(i))[self.which] for i in rows])


def chat_examples(tokenizer, conversations: Sequence[list[dict]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every conversation's row of ``ChatExamples``, as two tensors (for a few conversations)."""
    examples = ChatExamples(tokenizer, conversations, seq_len)
    every = torch.arange(len(examples))
    return examples.ids[every], examples.labels[every]


def _template(tokenizer, msgs: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def calibration_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    c = recipe.calibration
    return sample_windows(tokenize(tokenizer, read_text(c.data)), c.n_samples, c.seq_len, recipe.seed)


def eval_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    e = recipe.eval
    return nonoverlapping_windows(tokenize(tokenizer, read_text(e.ppl_data)), e.ppl_seq_len, e.ppl_max_windows)


def training_examples(recipe: Recipe, tokenizer, run_dir: Path) -> tuple:
    """``(ids, labels)`` of the training text, each indexed by rows; ``train.data: generated`` reads the generate
    stage of ``run_dir`` and cuts each sampled sequence into windows (never across two sequences); chat data is
    tokenized as its rows are read (``ChatExamples``)."""
    t = recipe.train
    if t.data == GENERATED:
        sequences = load_file(Path(run_dir) / "generate" / "tokens.safetensors")["ids"]
        whole = sequences.shape[1] // t.seq_len * t.seq_len
        ids = sequences[:, :whole].reshape(-1, t.seq_len)
        return ids, ids.clone()
    if t.data_format == "chat":
        examples = ChatExamples(tokenizer, records(t.data, "messages"), t.seq_len)
        return examples.ids, examples.labels
    return text_examples(tokenize(tokenizer, read_text(t.data)), t.seq_len)
