"""Distillation against a cached top-k teacher: a hand-computed KL, the full KL when k is the vocabulary, never above
it otherwise, and a training run on the cache that follows the full teacher's step for step when nothing is cut."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from gift_quant.checkpoint import CheckpointError, save_concatenated
from gift_quant.distill import TopKTeacher, distill_loss, read_cache, teacher_topk, topk_distill_loss
from gift_quant.recipe import RecipeError, TrainSpec
from gift_quant.train import train, windows_read

from .conftest import recipe, tiny_llama, tweak
from .helpers import measured
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
    """The tiny model's 256 tokens cached whole, written a batch of 3 windows at a time (the last batch shorter) and
    read back a step's rows at a time as the train stage reads it (``read_cache``): every step's loss and the trained columns equal the run with the teacher model beside every
    step; with k = 8 the run differs but still trains."""
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
        path = tmp_path / f"teacher{k}.safetensors"
        teacher_topk(teacher, ids, windows, path, k=k, temperature=1.0, batch_size=3, work=tmp_path / f"cache{k}",
                     key="key")
        return read_cache(path)

    full_model, full = trained(teacher, "full")
    cache_model, whole = trained(TopKTeacher(cached(256), len(ids), 1.0), "whole")
    assert whole["final_loss"] == pytest.approx(full["final_loss"], rel=1e-4)
    for (n, a), (_, b) in zip(full_model.named_parameters(), cache_model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    _, cut = trained(TopKTeacher(cached(8), len(ids), 1.0), "cut")
    assert cut["final_loss"] != full["final_loss"] and math.isfinite(cut["final_loss"])


def test_pieces_join_into_the_file_of_their_concatenation(tmp_path):
    """The reference is safetensors' own reader: each name of three pieces (rows 3, 1 and 4; float32, int32 and
    bfloat16) reads back as their ``torch.cat``, the extra tensors (a 0-d one among them) as they were; a piece that
    does not join is refused naming it and the tensor."""
    g = torch.Generator().manual_seed(0)
    pieces = [{"logp": torch.randn(n, 5, 2, generator=g), "idx": torch.randint(0, 9, (n, 7), generator=g,
                                                                             dtype=torch.int32),
               "half": torch.randn(n, 3, generator=g).bfloat16()} for n in (3, 1, 4)]
    paths = [tmp_path / f"piece-{i}.safetensors" for i in range(3)]
    for piece, path in zip(pieces, paths):
        save_file(piece, path, metadata={"key": "k"})
    extra = {"windows": torch.arange(8), "scalar": torch.tensor(2.5)}
    size = save_concatenated(paths, tmp_path / "joined.safetensors", extra)
    got = load_file(tmp_path / "joined.safetensors")
    assert set(got) == {"logp", "idx", "half", "windows", "scalar"}
    for name in ("logp", "idx", "half"):
        assert torch.equal(got[name], torch.cat([p[name] for p in pieces])), name
    assert torch.equal(got["windows"], extra["windows"]) and got["scalar"].item() == 2.5
    assert size == sum(t.numel() * t.element_size() for t in got.values())
    save_file({"logp": torch.zeros(2, 5, 3), "idx": torch.zeros(2, 7, dtype=torch.int32),
               "half": torch.zeros(2, 3).bfloat16()}, paths[1])
    with pytest.raises(CheckpointError, match=r"piece-1.safetensors: tensor logp is \('F32', \[2, 5, 3\]\)"):
        save_concatenated(paths, tmp_path / "bad.safetensors", extra)


def test_joining_the_cache_holds_one_piece_at_a_time(tmp_path):
    """Sixteen pieces of 4 MB (64 MB in all) join with under 16 MB added to the process (``torch.cat`` of them alone
    takes 64 MB); what is read back is the concatenation."""
    got = measured(f"""
import json, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
from gift_quant import devices
from gift_quant.checkpoint import save_concatenated
folder = Path({str(tmp_path)!r})
paths = []
for i in range(16):
    paths.append(folder / f"batch-{{i:05d}}.safetensors")
    save_file({{"logp": torch.full((4, 1024, 256), float(i))}}, paths[-1])
with devices.peak(torch.device("cpu")) as used:
    save_concatenated(paths, folder / "teacher.safetensors", {{"windows": torch.arange(64)}})
with safe_open(str(folder / "teacher.safetensors"), "pt") as f:
    rows = f.get_slice("logp")
    same = list(rows.get_shape()) == [64, 1024, 256] and all(rows[4 * i : 4 * i + 1].eq(i).all() for i in range(16))
print(json.dumps({{"added": used.added, "same": bool(same)}}))
""")
    assert got["same"]
    assert got["added"] < 16 * 2**20, got["added"]


def test_a_damaged_teacher_piece_is_named_and_redone(tmp_path, caplog):
    """A truncated finished batch of the teacher stage's work folder: the rerun names it, computes it again and
    writes the same cache, byte for byte, as the run that was not disturbed."""
    teacher, windows = tiny_llama(seed=5), torch.arange(8)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))

    def cache(name):
        teacher_topk(teacher, ids, windows, tmp_path / name, k=4, temperature=1.0, batch_size=3,
                     work=tmp_path / "work", key="key")
        return (tmp_path / name).read_bytes()

    first = cache("first.safetensors")
    piece = tmp_path / "work" / "batch-00001.safetensors"
    piece.write_bytes(piece.read_bytes()[:50])
    assert cache("again.safetensors") == first
    assert "batch-00001.safetensors" in caplog.text and "redoes this piece" in caplog.text


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
