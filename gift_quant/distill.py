"""Distillation: the KL from the full-precision teacher's next-token distribution to the student's.

Two teachers. The full one runs the teacher forward beside every training step (its memory and time each
step). The cached one keeps, per training window and position, the teacher's ``k`` largest log-probabilities
and their token ids, computed once before training (the ``teacher`` stage) for exactly the windows the steps
will read; the loss is then the KL of the two distributions coarsened to ``{top-k tokens, everything else}``:

    KL_k = sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),   p_rest = 1 - sum p_i

which equals the full KL when ``k`` is the vocabulary and is never above it (coarsening can only lose
information), so it pulls toward the same minimum. Both at temperature ``T``, scaled by ``T^2``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import save_concatenated
from .rundir import load_piece, save_piece


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` per token, averaged over the tokens that carry a label."""
    keep = labels[:, 1:] != -100
    s = F.log_softmax(student[:, :-1][keep].float() / temperature, -1)
    t = F.log_softmax(teacher[:, :-1][keep].float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def topk_distill_loss(student: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T^2 * KL_k`` (module docstring) per token, averaged over the tokens that carry a label; ``logp`` / ``idx``:
    the teacher's top-k log-probabilities at temperature ``T`` and their ids for positions ``0 .. seq_len-2``."""
    keep = labels[:, 1:] != -100
    s = F.log_softmax(student[:, :-1][keep].float() / temperature, -1)
    p_log, i = logp[keep].float(), idx[keep].long()
    q_log = s.gather(-1, i)
    p_rest = (1 - p_log.exp().sum(-1)).clamp_min(0)
    q_rest_log = torch.log1p(-q_log.exp().sum(-1).clamp(max=1 - 1e-6))
    top = (p_log.exp() * (p_log - q_log)).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest_log), torch.zeros_like(p_rest))
    return (top + rest).mean() * temperature**2


@torch.no_grad()
def teacher_topk(teacher: nn.Module, ids, windows: torch.Tensor, out: Path, *, k: int, temperature: float,
                 batch_size: int, work: Path, key: str) -> int:
    """``out``, the teacher cache: the teacher's top-k log-probabilities (``logp``, float32) and token ids (``idx``,
    int32) at positions ``0 .. seq_len-2`` of the rows ``windows`` of ``ids`` (a tensor, or training examples read
    a batch at a time), and ``windows``. Each batch waits in ``work`` (``rundir.save_piece``: a rerun resumes) until
    all are done; the file is then joined from them a piece at a time (``checkpoint.save_concatenated``: the cache
    grows with the steps, 8 bytes a token and k). Returns its bytes of tensor data."""
    work.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    teacher.eval()
    pieces = []
    for j in tqdm(range(0, len(windows), batch_size), desc="teacher top-k", unit="batch"):
        path = work / f"batch-{j // batch_size:05d}.safetensors"
        if load_piece(path, key, "teacher") is None:
            x = ids[windows[j : j + batch_size]].to(device)
            logits = teacher(input_ids=x, use_cache=False).logits[:, :-1]
            top = F.log_softmax(logits.float() / temperature, -1).topk(k, dim=-1)
            save_piece(path, {"logp": top.values.cpu().contiguous(),
                              "idx": top.indices.to(torch.int32).cpu().contiguous()}, key)
        pieces.append(path)
    return save_concatenated(pieces, out, {"windows": windows})


class FullTeacher:
    """The teacher model run beside every step."""

    def __init__(self, model: nn.Module, temperature: float):
        self.model, self.temperature = model.eval(), temperature

    def loss(self, student: torch.Tensor, x: torch.Tensor, _windows: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.model(input_ids=x, use_cache=False).logits
        return distill_loss(student, teacher, labels, self.temperature)


class RowsOnDisk:
    """One tensor of a safetensors file read a row at a time (memory-mapped by ``safe_open``): ``rows_on_disk[rows]``
    for a tensor of row numbers is what the step needs, not the whole cache."""

    def __init__(self, path: Path, name: str):
        from safetensors import safe_open

        self.file = safe_open(str(path), framework="pt")
        self.tensor = self.file.get_slice(name)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.tensor[r : r + 1][0] for r in rows.tolist()])


def read_cache(path: Path) -> dict:
    """The teacher stage's cache (``teacher.safetensors``) as ``TopKTeacher`` reads it: the window list in memory,
    the log-probabilities and ids read a step's rows at a time (the whole cache is 8 bytes a token and k)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        windows = f.get_tensor("windows")
    return {"logp": RowsOnDisk(path, "logp"), "idx": RowsOnDisk(path, "idx"), "windows": windows}


class TopKTeacher:
    """The cached teacher as the training step reads it: ``rows[i]`` is where window ``i`` of the training text
    sits in the cache (-1: not cached, which the step refuses by name). ``cache``: tensors, or ``read_cache``'s."""

    def __init__(self, cache: dict, n_windows: int, temperature: float):
        self.logp, self.idx, self.temperature = cache["logp"], cache["idx"], temperature
        self.rows = torch.full((n_windows,), -1, dtype=torch.long)
        self.rows[cache["windows"].long()] = torch.arange(len(cache["windows"]))

    def loss(self, student: torch.Tensor, _x: torch.Tensor, windows: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        rows = self.rows[windows.cpu()]
        if (rows < 0).any():
            raise RuntimeError(f"training windows {windows[rows < 0].tolist()} are not in the teacher cache (the "
                               f"teacher stage cached the windows of train.steps on one process); rerun with --from "
                               f"teacher")
        d = student.device
        return topk_distill_loss(student, self.logp[rows].to(d), self.idx[rows].to(d), labels, self.temperature)
