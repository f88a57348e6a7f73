"""Self-generated training text: greedy when top_p keeps one token (checked against a hand-written loop), the same
text for the same seed, batches reused after a kill, and the pipeline training on it."""
import json

import pytest
import torch

from gift_quant import generate
from gift_quant.recipe import GenerateSpec, RecipeError

from .conftest import recipe, tiny_llama, tweak

EOS = 7
SPECIAL = [0, 1, 2, EOS]


class _Tok:
    """What generation reads of a tokenizer."""
    eos_token_id = EOS
    all_special_ids = SPECIAL


def _greedy(model, first: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The reference: argmax of the full forward at every position, the end-of-sequence token never chosen."""
    ids = first
    with torch.no_grad():
        while ids.shape[1] < seq_len:
            logits = model(ids).logits[:, -1].clone()
            logits[:, EOS] = -torch.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def test_a_nucleus_of_one_token_is_greedy_decoding():
    model = tiny_llama(vocab=64)
    first = generate.first_tokens(64, SPECIAL, 3, seed=5)
    spec = GenerateSpec(top_p=1e-9, seq_len=12)
    assert torch.equal(generate.sample_batch(model, first, spec, 0, [EOS]), _greedy(model, first, 12))


def test_first_tokens_are_uniform_over_the_ordinary_vocabulary():
    ids = generate.first_tokens(16, SPECIAL, 12000, seed=0).squeeze(1)
    counts = torch.bincount(ids, minlength=16)
    assert (counts[SPECIAL] == 0).all()
    ordinary = counts[[i for i in range(16) if i not in SPECIAL]].float()
    assert (ordinary - 1000).abs().max() < 150  # 12000 draws over 12 ids: about 1000 each (sd ~ 29)


def test_same_seed_same_text_and_batches_reused_after_a_kill(tmp_path, monkeypatch):
    model = tiny_llama(vocab=64)
    spec = GenerateSpec(tokens=5 * 16, seq_len=16, batch_size=2)  # 5 sequences: batches of 2, 2, 1
    whole = generate.generate_texts(model, _Tok, spec, seed=3, work=tmp_path / "a", key="k")
    assert whole.shape == (5, 16) and not (whole[:, 1:] == EOS).any()
    assert torch.equal(whole, generate.generate_texts(model, _Tok, spec, seed=3, work=tmp_path / "b", key="k"))
    assert not torch.equal(whole, generate.generate_texts(model, _Tok, spec, seed=4, work=tmp_path / "c", key="k"))
    real, calls = generate.sample_batch, []

    def killed_in_the_second_batch(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(generate, "sample_batch", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate.generate_texts(model, _Tok, spec, seed=3, work=tmp_path / "d", key="k")
    resumed = []
    monkeypatch.setattr(generate, "sample_batch", lambda *a, **k: (resumed.append(1), real(*a, **k))[1])
    assert torch.equal(whole, generate.generate_texts(model, _Tok, spec, seed=3, work=tmp_path / "d", key="k"))
    assert len(resumed) == 2  # the first batch was kept


@pytest.mark.slow
def test_the_pipeline_trains_gift_sw_and_lora_on_generated_text(tiny_folder, tmp_path):
    from gift_quant import pipeline
    from gift_quant.data import training_examples
    from gift_quant.sources import load_tokenizer

    out = tmp_path / "run"
    r = tweak(recipe(tiny_folder, out, ["gift"]), **{"train.data": "generated", "generate.tokens": 600,
                                                      "generate.seq_len": 128, "eval.baselines": ["lora"],
                                                      "eval.tasks": []})
    order = pipeline.stages(r)
    assert order.index("generate") == order.index("train") - 1
    pipeline.recover(r)
    manifest = json.loads((out / "generate/manifest.json").read_text())
    assert manifest["sequences"] == 5 and manifest["tokens"] == 640
    ids, labels = training_examples(r, load_tokenizer(r.model.ref), out)
    assert ids.shape == (10, 64) and torch.equal(ids, labels)  # each 128-token sequence cut in two windows of 64
    for stage in ("train", "lora"):
        assert (out / stage / "train_log.jsonl").read_text().strip()


def test_generated_text_fields_are_refused_where_they_do_not_apply(tiny_folder, tmp_path):
    r = recipe(tiny_folder, tmp_path)
    with pytest.raises(RecipeError, match=r"generate.tokens is set, but train.data = .* reads a text"):
        tweak(r, **{"generate.tokens": 100})
    with pytest.raises(RecipeError, match=r"train.data = generated samples plain text, but train.data_format = chat"):
        tweak(r, **{"train.data": "generated", "train.data_format": "chat"})
    with pytest.raises(RecipeError, match=r"train.seq_len = 64 is longer than a generated sequence .generate.seq_len = 32"):
        tweak(r, **{"train.data": "generated", "generate.seq_len": 32})
