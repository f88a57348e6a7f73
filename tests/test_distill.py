"""Distillation against a cached top-k teacher: a hand-computed KL, the full KL when k is the vocabulary, never above
it otherwise, and a training run on the cache that follows the full teacher's step for step when nothing is cut."""
import math

import pytest
import torch
from safetensors.torch import save_file

from gift_quant.distill import TopKTeacher, distill_loss, read_cache, teacher_topk, topk_distill_loss
from gift_quant.recipe import RecipeError, TrainSpec
from gift_quant.train import train, windows_read

from .conftest import recipe, tiny_llama, tweak
from .train_worker import build


def _topk(logits: torch.Tensor, k: int, temperature: float = 1.0):
    top = torch.log_softmax(logits[:, :-1] / temperature, -1).topk(k, -1)
    return top.values, top.indices


def test_top_1_of_three_tokens_by_hand():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2])
    teacher, student = p.log().expand(1, 2, 3), q.log().expand(1, 2, 3)  # two positions: the first is scored
    logp, idx = _topk(teacher, 1)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    got = topk_distill_loss(student, logp, idx, torch.ones(1, 2, dtype=torch.long), 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_whole_vocabulary_is_the_full_kl_and_fewer_tokens_never_exceed_it(temperature):
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 9, 50, generator=g) * 3, torch.randn(3, 9, 50, generator=g) * 3
    labels = torch.ones(3, 9, dtype=torch.long)
    labels[0, 4:] = -100
    full = distill_loss(student, teacher, labels, temperature)
    torch.testing.assert_close(topk_distill_loss(student, *_topk(teacher, 50, temperature), labels, temperature), full)
    for k in (1, 5, 20):
        kd = topk_distill_loss(student, *_topk(teacher, k, temperature), labels, temperature)
        assert 0 <= float(kd) <= float(full) + 1e-6


def test_training_on_the_whole_vocabulary_cache_follows_the_full_teacher(tmp_path):
    """The tiny model's 256 tokens cached whole, saved and read back a step's rows at a time as the train stage reads
    it (``read_cache``): every step's loss and the trained columns equal the run with the teacher model beside every
    step; with k = 8 (in memory) the run differs but still trains."""
    spec = TrainSpec(steps=4, lr=3e-2, micro_batch_size=4, grad_accum=1, seq_len=32, warmup_ratio=0.0, noise="none",
                     distill=1.0, checkpoint_every=10)
    teacher = tiny_llama(seed=5)
    _, ids = build()
    windows = windows_read(len(ids), spec, 1, seed=0)
    assert len(windows) == 16  # 4 steps x 4 examples, each window once

    def trained(with_teacher, out):
        model, _ = build()
        summary = train(model, ids, ids.clone(), spec, tmp_path / out, seed=0, teacher=with_teacher)
        return model, summary

    def cached(k):
        cache = teacher_topk(teacher, ids, windows, k, 1.0, 4, tmp_path / f"cache{k}", "key")
        return {**cache, "windows": windows}

    full_model, full = trained(teacher, "full")
    save_file(cached(256), tmp_path / "teacher.safetensors")
    cache_model, whole = trained(TopKTeacher(read_cache(tmp_path / "teacher.safetensors"), len(ids), 1.0), "whole")
    assert whole["final_loss"] == pytest.approx(full["final_loss"], rel=1e-4)
    for (n, a), (_, b) in zip(full_model.named_parameters(), cache_model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    _, cut = trained(TopKTeacher(cached(8), len(ids), 1.0), "cut")
    assert cut["final_loss"] != full["final_loss"] and math.isfinite(cut["final_loss"])


def test_a_window_missing_from_the_cache_is_refused_by_name():
    cache = {"logp": torch.zeros(1, 3, 2), "idx": torch.zeros(1, 3, 2, dtype=torch.int32), "windows": torch.tensor([4])}
    with pytest.raises(RuntimeError, match=r"training windows \[2\] are not in the teacher cache.*--from teacher"):
        TopKTeacher(cache, 8, 1.0).loss(torch.zeros(2, 4, 5), None, torch.tensor([4, 2]), torch.ones(2, 4, dtype=torch.long))


@pytest.mark.slow
def test_the_teacher_stage_caches_what_the_train_and_lora_stages_read(tiny_folder, tmp_path):
    import json

    from gift_quant import pipeline

    out = tmp_path / "run"
    r = tweak(recipe(tiny_folder, out, ["gift"]), **{"train.distill": 1.0, "train.distill_topk": 4,
                                                      "eval.baselines": ["lora"], "eval.tasks": []})
    order = pipeline.stages(r)
    assert order.index("teacher") == order.index("train") - 1 < order.index("lora")
    pipeline.recover(r)
    manifest = json.loads((out / "teacher/manifest.json").read_text())
    assert manifest["windows"] == 8 and manifest["k"] == 4  # 4 steps x 2 examples
    for stage in ("train", "lora"):
        assert (out / stage / "train_log.jsonl").read_text().strip()


def test_a_topk_teacher_without_distillation_is_refused(tiny_folder, tmp_path):
    with pytest.raises(RecipeError, match=r"train.distill_topk = 4 caches a teacher, but train.distill = 0"):
        tweak(recipe(tiny_folder, tmp_path), **{"train.distill_topk": 4})
