"""The recipe's texts as token tensors: calibration windows, training examples, evaluation windows.

Reading a text (files, packages, hub data sets) is ``sources``' job; this module only cuts the
tokens: random windows for calibration (seeded, so a rerun calibrates on the same tokens),
consecutive windows for perplexity and plain-text training, and chat conversations through the
tokenizer's template with labels on the assistant turns only; text the model generated (``generate``) is
cut into windows like plain text. Training text is read as the steps read it (``TextExamples`` over a token file,
``ChatExamples``): what a data set costs in memory does not grow with its size.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file

from .recipe import GENERATED
from .sources import SourceError, local_or_package, piece_ids, records, text_ids

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


class Examples:
    """Training rows of ``seq_len`` tokens, each built only when a step reads it: ``ids[idx]`` and ``labels[idx]``
    (-100 where no loss is taken) are what ``train`` takes, indexed by a tensor or list of rows. The last rows read
    are kept for the other half of the pair."""

    def __init__(self, seq_len: int, keep: int = 256):
        self.seq_len = seq_len
        self._row = functools.lru_cache(maxsize=keep)(self._build)
        self.ids, self.labels = _Rows(self, 0), _Rows(self, 1)

    def __len__(self) -> int:
        raise NotImplementedError

    def _build(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TextExamples(Examples):
    """Packed plain text: consecutive windows of a token array (the incomplete tail dropped), every token a label.
    ``tokens`` may be memory-mapped from a file (``text_tokens``): a window is read when a step reads it."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < seq_len:
            raise ValueError(f"text of {len(tokens)} tokens is shorter than one window of {seq_len}")
        super().__init__(seq_len)
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def _build(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        window = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype(np.int64))
        return window, window


class ChatExamples(Examples):
    """Chat conversations as training rows, each templated and tokenized when a step reads it, labels on the
    assistant turns only. Hundreds of thousands of conversations cost what the rows read cost, not the data set's
    size: the records stay where ``sources.records`` reads them."""

    def __init__(self, tokenizer, conversations: Sequence[list[dict]], seq_len: int, keep: int = 256):
        super().__init__(seq_len, keep)
        self.tokenizer, self.conversations = tokenizer, conversations
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.conversations)

    def _build(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    """``ids`` or ``labels`` of ``Examples``: indexed by a tensor or list of rows, shaped like the tensor it stands
    for."""

    def __init__(self, examples: Examples, which: int):
        self.examples, self.which = examples, which

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.examples), self.examples.seq_len

    def __getitem__(self, idx) -> torch.Tensor:
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        return torch.stack([self.examples._row(int(i))[self.which] for i in rows])


def text_tokens(tokenizer, ref: str, folder: Path) -> np.ndarray:
    """The tokens of a text as int32, memory-mapped from ``folder``, where the first call writes them a piece at a
    time (``sources.text_pieces``: the whole text's tokens; under a temporary name, renamed when complete). The file
    is named by the text (its reference, and a file's size and time) and the tokenizer: the stages that read the
    training text tokenize it once, and a changed text or tokenizer is tokenized again."""
    path = Path(folder) / f"{_text_digest(tokenizer, ref)}.int32"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of one run may write it at once
        with open(tmp, "wb") as f:
            for ids in piece_ids(tokenizer, ref):
                ids.numpy().tofile(f)
        os.replace(tmp, path)
    return np.memmap(path, dtype=np.int32, mode="r") if path.stat().st_size else np.zeros(0, np.int32)


def _text_digest(tokenizer, ref: str) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    path = None if ref.startswith("hf://") else local_or_package(ref)
    stamp = [path.stat().st_size, path.stat().st_mtime_ns] if path is not None and path.exists() else []
    return hashlib.sha256(json.dumps([ref, stamp, vocab]).encode()).hexdigest()[:16]


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
    return sample_windows(text_ids(tokenizer, c.data), c.n_samples, c.seq_len, recipe.seed)


def eval_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    e = recipe.eval
    return text_windows(tokenizer, e.ppl_data, e.ppl_seq_len, e.ppl_max_windows)


def text_windows(tokenizer, ref: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``nonoverlapping_windows`` of a text, tokenized only as far as the windows reach."""
    limit = None if max_windows is None else max_windows * seq_len
    return nonoverlapping_windows(text_ids(tokenizer, ref, limit), seq_len, max_windows)


def training_examples(recipe: Recipe, tokenizer, run_dir: Path) -> tuple:
    """``(ids, labels)`` of the training text, each indexed by rows; ``train.data: generated`` reads the generate
    stage of ``run_dir`` and cuts each sampled sequence into windows (never across two sequences); chat data is
    tokenized as its rows are read (``ChatExamples``), plain text once into ``run_dir/tokens.work/`` and read from
    there a window at a time (``TextExamples``)."""
    t = recipe.train
    if t.data == GENERATED:
        sequences = load_file(Path(run_dir) / "generate" / "tokens.safetensors")["ids"]
        whole = sequences.shape[1] // t.seq_len * t.seq_len
        ids = sequences[:, :whole].reshape(-1, t.seq_len)
        return ids, ids.clone()
    if t.data_format == "chat":
        examples = ChatExamples(tokenizer, records(t.data, "messages"), t.seq_len)
        return examples.ids, examples.labels
    examples = TextExamples(text_tokens(tokenizer, t.data, Path(run_dir) / "tokens.work"), t.seq_len)
    return examples.ids, examples.labels
