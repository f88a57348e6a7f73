"""Training: loss goes down, only salient columns change, resume is exact, DDP keeps ranks equal."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gift_quant.data import chat_examples
from gift_quant.distill import distill_loss
from gift_quant.recipe import TrainSpec
from gift_quant.train import batch_indices, train

from .conftest import crash_at
from .helpers import measured
from .train_worker import build, run


def test_training_lowers_loss_and_keeps_base_frozen(tmp_path):
    before, ids = build()
    base_before = {n: b.clone() for n, b in before.named_buffers()}
    with torch.no_grad():
        loss0 = before(input_ids=ids, labels=ids).loss.item()
    model, summary = run(tmp_path, 12)
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss.item()
    assert loss1 < loss0 - 0.15, (loss0, loss1)
    for n, b in model.named_buffers():
        assert torch.equal(b, base_before[n]), n  # codes, scales, noise steps untouched
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    assert changed and all(n.endswith("salient_weight") for n in changed)
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 12


def test_resume_after_crash_reaches_the_same_weights(tmp_path):
    straight, _ = run(tmp_path / "a", 8)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", 8, on_step=crash_at(5, RuntimeError("simulated crash")))
    assert (tmp_path / "b/checkpoints/latest").read_text() == "step-3"
    resumed, summary = run(tmp_path / "b", 8)
    assert summary["steps_run"] == 5
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_batches_partition_the_data_across_ranks_and_steps():
    spec = TrainSpec(micro_batch_size=2, grad_accum=2)
    seen = torch.cat([batch_indices(16, s, m, spec, r, 2, seed=0) for s in range(2) for m in range(2) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(16))  # one epoch, each example exactly once


def test_a_run_that_reads_its_data_more_than_once_says_so(tmp_path, caplog):
    # 64 examples, 4 a micro-batch x 2 accumulated: 8 steps read them exactly once, 12 steps 1.5 times
    with caplog.at_level("WARNING", logger="gift_quant.train"):
        _, once = run(tmp_path / "a", 8)
    assert once["epochs"] == 1.0 and "memorized" not in caplog.text
    with caplog.at_level("WARNING", logger="gift_quant.train"):
        _, twice = run(tmp_path / "b", 12)
    assert twice["epochs"] == 1.5
    assert "read the 64 examples of train.data 1.50 times" in caplog.text


def test_distill_loss_is_zero_for_identical_logits_and_matches_kl():
    t = torch.randn(2, 5, 11)
    labels = torch.ones(2, 5, dtype=torch.long)
    assert distill_loss(t, t, labels, 1.0).abs() < 1e-6
    s = torch.randn(2, 5, 11)
    p, q = t[:, :-1].softmax(-1), s[:, :-1].softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s, t, labels, 1.0), kl, atol=1e-5, rtol=1e-5)


def test_chat_labels_cover_only_assistant_turns(smollm2):
    _, tok = smollm2
    conv = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}]
    ids, labels = chat_examples(tok, [conv], 64)
    target = tok.decode([t for t in labels[0].tolist() if t != -100])
    assert "Hi there!" in target and "Say hi" not in target


def _torchrun(out: Path, steps: int, *crash_at: int) -> subprocess.CompletedProcess:
    worker = Path(__file__).with_name("train_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(worker), str(out), str(steps), *map(str, crash_at)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_process_ddp_keeps_salient_weights_identical(tmp_path):
    out = _torchrun(tmp_path, 4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [(tmp_path / f"world-rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
    a, b = load_file(tmp_path / "salient-rank0.safetensors"), load_file(tmp_path / "salient-rank1.safetensors")
    init, _ = build()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], dict(init.named_parameters())[k]) for k in a)  # and they did train


@pytest.mark.slow
def test_two_process_ddp_resume_is_bit_exact(tmp_path):
    """Killed after step 4 (checkpoint at 3), both ranks resume from their own saved RNG and optimizer state
    and end exactly where an uninterrupted two-process run ends."""
    assert _torchrun(tmp_path / "straight", 6).returncode == 0
    assert _torchrun(tmp_path / "resumed", 6, 4).returncode != 0
    assert (tmp_path / "resumed/checkpoints/latest").read_text() == "step-3"
    again = _torchrun(tmp_path / "resumed", 6)
    assert again.returncode == 0, again.stderr[-3000:]
    for rank in (0, 1):
        a = load_file(tmp_path / f"straight/salient-rank{rank}.safetensors")
        b = load_file(tmp_path / f"resumed/salient-rank{rank}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_logits_are_freed_before_backward(tmp_path, monkeypatch):
    """The model's output (logits: vocabulary x tokens, the largest activation of a step) is not held through the
    backward pass: autograd keeps what it needs, and the step drops the rest."""
    import weakref

    from accelerate import Accelerator

    alive = []
    model, ids = build()
    refs = []
    model.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out.logits)))
    backward = Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (
        alive.append(refs[-1]() is not None), backward(self, loss, **kw))[-1])
    spec = TrainSpec(steps=2, lr=1e-3, micro_batch_size=4, grad_accum=2, seq_len=32, warmup_ratio=0.0)
    train(model, ids, ids.clone(), spec, tmp_path, checkpoints=False)
    assert alive == [False] * 4


def test_chat_data_is_tokenized_as_the_steps_read_it(tmp_path):
    """100,000 conversations in a jsonl file: building the examples and reading a step's rows adds under 40 MB to
    the process (tokenized whole into lists, as before, they took hundreds of MB and minutes), and each row read
    lazily equals the same conversation tokenized on its own (``chat_examples``)."""
    import json

    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 50)},
                                      {"role": "assistant", "content": f"answer {i} " + "text " * (i % 40)}]})
             for i in range(100_000)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    code = f"""
import json, torch
from gift_quant import devices
from gift_quant.data import ChatExamples, chat_examples
from gift_quant.sources import SMOLLM2, load_tokenizer, records
tok = load_tokenizer(SMOLLM2)
rows = torch.tensor([5, 99_999, 50_000, 17])
with devices.peak(torch.device("cpu")) as used:
    conversations = records({str(tmp_path / "chat.jsonl")!r}, "messages")
    examples = ChatExamples(tok, conversations, 128)
    ids, labels = examples.ids[rows], examples.labels[rows]
alone = [chat_examples(tok, [conversations[i]], 128) for i in rows.tolist()]
same = all(torch.equal(ids[j], a[0][0]) and torch.equal(labels[j], a[1][0]) for j, a in enumerate(alone))
print(json.dumps({{"n": len(examples), "shape": list(examples.ids.shape), "added": used.added, "same": same}}))
"""
    got = measured(code)
    assert got["n"] == 100_000 and got["shape"] == [100_000, 128] and got["same"]
    assert got["added"] < 40 * 2**20, got["added"]


def test_plain_text_is_tokenized_once_into_a_file_and_read_a_window_at_a_time(tmp_path):
    """A text of 8 MB (the bundled C4 six times): tokenizing it into the token file and reading a step's windows adds
    under 32 MB to the process, one piece's encoding (tokenized whole, as before, it takes over 1 GB and grows with
    the text), and the windows equal the whole text tokenized at once. A second call reads the file without the
    tokenizer; a changed text is tokenized again."""
    from gift_quant.data import TextExamples, text_tokens
    from gift_quant.sources import C4, SMOLLM2, load_tokenizer, read_text

    text = tmp_path / "big.txt"
    text.write_text(read_text(C4) * 6)
    got = measured(f"""
import json, torch
from gift_quant import devices
from gift_quant.data import TextExamples, nonoverlapping_windows, text_tokens
from gift_quant.sources import SMOLLM2, load_tokenizer, read_text, tokenize
tok = load_tokenizer(SMOLLM2)
rows = torch.tensor([5, 7000, 3000, 17])
with devices.peak(torch.device("cpu")) as used:
    examples = TextExamples(text_tokens(tok, {str(text)!r}, {str(tmp_path / "tokens")!r}), 256)
    ids, labels = examples.ids[rows], examples.labels[rows]
whole = nonoverlapping_windows(tokenize(tok, read_text({str(text)!r})), 256)
same = len(examples) == len(whole) and torch.equal(ids, whole[rows]) and torch.equal(labels, whole[rows])
print(json.dumps({{"n": len(examples), "added": used.added, "same": same}}))
""")
    assert got["n"] > 7000 and got["same"]
    assert got["added"] < 32 * 2**20, got["added"]

    class Refuses:  # the same tokenizer's identity, no tokenizing
        backend_tokenizer = load_tokenizer(SMOLLM2).backend_tokenizer

        def __call__(self, *_a, **_k):
            raise AssertionError("tokenized again")

    again = TextExamples(text_tokens(Refuses(), str(text), tmp_path / "tokens"), 256)
    assert len(again) == got["n"] and len(list((tmp_path / "tokens").iterdir())) == 1
    with open(text, "a") as f:
        f.write(" more words")
    with pytest.raises(AssertionError, match="tokenized again"):
        text_tokens(Refuses(), str(text), tmp_path / "tokens")
