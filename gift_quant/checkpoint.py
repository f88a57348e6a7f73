"""Checkpoint I/O shared by every format: the error type, reading safetensors and JSON with their errors
translated, state assignment onto a meta-built model, and the tables the formats agree on.

A checkpoint written elsewhere (or copied, or truncated by a full disk) must fail in one line that names
the file and what to do about it, never as a library's traceback an hour into a run; every reader of a
safetensors or JSON file goes through here. ``save_quantized`` / ``load_quantized`` keep every
``QuantizedWeight`` of a run (codes as uint8, not yet bit-packed) in one safetensors file; shapes and
dtypes are checked on load and a missing or malformed tensor is named in the error.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .grid import QuantizedWeight


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or does not match its description."""


REDO_STAGE = "rerun the stage that wrote it"


COPY_AGAIN = "the file is damaged: download or copy the checkpoint again"


def read_json(path: Path, fix: str = "the file is damaged") -> dict:
    """A JSON file (one the pipeline wrote, or a checkpoint's config or index); a damaged or unreadable one is
    named with ``fix``, what to do about it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None


def folder_config(folder: Path) -> dict:
    """A model folder's ``config.json`` ({} where there is none: a hub id or a file)."""
    path = Path(folder) / "config.json"
    return read_json(path) if path.is_file() else {}


@contextmanager
def _opened(path: Path, fix: str):
    """``safe_open(path)``, its errors (truncated file, a header whose shapes its bytes do not hold, an unreadable
    file) as one ``CheckpointError`` naming the file and ``fix`` (what to do)."""
    from safetensors import safe_open

    if not Path(path).exists():  # not "corrupt": nothing was written there
        raise CheckpointError(f"{path}: no such file: {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); it is corrupt or truncated: "
                              f"{fix}") from None


def read_safetensors(path: Path, keep=None, fix: str = REDO_STAGE) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a safetensors file whose names ``keep(name)`` accepts (default: all) and its metadata."""
    with _opened(path, fix) as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}, f.metadata() or {}


def safetensors_keys(path: Path, fix: str = REDO_STAGE) -> list[str]:
    """The tensor names of a safetensors file, from its header (checked against the file's size; no tensor read)."""
    with _opened(path, fix) as f:
        return list(f.keys())


def save_concatenated(pieces: list[Path], path: Path, extra: dict[str, torch.Tensor]) -> int:
    """One safetensors file holding, for each tensor name of ``pieces`` (safetensors files alike in names, dtypes and
    all but the first dimension), the pieces' tensors joined along the first dimension, and ``extra``'s tensors:
    what ``save_file({**{n: torch.cat(...)}, **extra})`` writes, read back the same, with one piece's tensor in
    memory at a time (a cache of a hundred thousand windows need not fit twice in host memory). Writes the format
    (an 8-byte little-endian header length, the JSON header, the tensors' bytes in its order) by hand: safetensors
    has no writer that appends. Returns the bytes of tensor data."""
    import math
    import struct

    def described(f, name: str) -> tuple[str, list[int]]:
        sl = f.get_slice(name)
        return sl.get_dtype(), list(sl.get_shape())

    with _opened(pieces[0], REDO_STAGE) as f:
        first = {name: described(f, name) for name in f.keys()}
    rows = dict.fromkeys(first, 0)
    for piece in pieces:
        with _opened(piece, REDO_STAGE) as f:
            for name, (dtype, shape) in first.items():
                got = described(f, name) if name in f.keys() else None
                if got is None or got[0] != dtype or got[1][1:] != shape[1:]:
                    raise CheckpointError(f"{piece}: tensor {name} is {got or 'missing'}, the first piece's "
                                          f"{dtype} {shape}: the pieces do not join; {REDO_STAGE}")
                rows[name] += got[1][0]
    names = {v: k for k, v in HEADER_DTYPES.items()}
    layout = [(n, d, [rows[n], *s[1:]]) for n, (d, s) in first.items()]
    layout += [(n, names[t.dtype], list(t.shape)) for n, t in extra.items()]
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * HEADER_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name in first:
            for piece in pieces:
                with _opened(piece, REDO_STAGE) as f:
                    out.write(_raw(f.get_tensor(name)))
        for tensor in extra.values():
            out.write(_raw(tensor))
    return offset


def _raw(tensor: torch.Tensor):
    """A tensor's bytes in memory order (little-endian on every machine torch runs on), as safetensors stores them:
    a view, not a copy."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def check_scales(where: Path | str, name: str, scales: torch.Tensor) -> None:
    """Grid scales must be finite and positive: a NaN or a zero step would otherwise surface hours later as a
    NaN loss or perplexity."""
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bad.any():
        value = scales[bad].flatten()[0].item()
        raise CheckpointError(f"{where}: tensor {name} holds {int(bad.sum())} scale(s) that are not finite and "
                              f"positive (first: {value}); the checkpoint is damaged or was written wrongly")


def check_g_idx(path: Path, name: str, g_idx: torch.Tensor, in_features: int, n_groups: int) -> torch.Tensor:
    """A layer's ``g_idx`` (group of each input column) as int64, after checking its shape and range."""
    if tuple(g_idx.shape) != (in_features,):
        raise CheckpointError(f"{path}: tensor {name}.g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise CheckpointError(f"{path}: tensor {name}.g_idx holds groups outside 0..{n_groups - 1}")
    return g_idx.long()


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path,
                 replaced: frozenset[str] = frozenset()) -> None:
    """Load ``state`` into a model built on the meta device (``assign=True``) and refuse any tensor the
    model's config does not account for. Parameters of the ``replaced`` layers (already built from the
    checkpoint's packed tensors) and a tied ``lm_head.weight`` may be absent from ``state``."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [m for m in missing if m.rpartition(".")[0].removesuffix(".base") not in replaced
               and not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match the model of config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()


def base_state(model, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` except the quantized linears' weights (tied lm_head left to the config)."""
    state = {}
    for k, v in model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if module in quantized and leaf != "bias":
            continue
        if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        state[k] = v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
    return state


def symmetric(results: dict[str, QuantizedWeight]) -> bool:
    """Whether every zero point is the symmetric grid's ``2^(bits-1)``."""
    return all(bool((qw.zero == 2 ** (qw.bits - 1)).all()) for qw in results.values())


# a safetensors header's dtype names
HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8,
                 "BOOL": torch.bool}


def packed_shapes(n_in: int, n_out: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one ``(n_out, n_in)`` linear's tensors in GPTQ's packing (int32 words; the ``gift`` format adds
    its salient columns)."""
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    return {"qweight": (-(-n_in * bits // 32), n_out), "qzeros": (n_groups, -(-n_out * bits // 32)),
            "scales": (n_groups, n_out), "g_idx": (n_in,)}


_FIELDS = ("codes", "scale", "zero", "salient_idx", "salient_weight")


def save_quantized(results: dict[str, QuantizedWeight], path: Path) -> None:
    tensors, meta = {}, {}
    for name, qw in results.items():
        for f in _FIELDS:
            tensors[f"{name}.{f}"] = getattr(qw, f).contiguous()
        if qw.g_idx is not None:
            tensors[f"{name}.g_idx"] = qw.g_idx.contiguous()
        meta[name] = {"bits": qw.bits, "group_size": qw.group_size}
    save_file(tensors, str(path), metadata={"layers": json.dumps(meta)})


def load_quantized(path: Path) -> dict[str, QuantizedWeight]:
    tensors, meta = read_safetensors(Path(path))
    if "layers" not in meta:
        raise CheckpointError(f"{path}: no 'layers' metadata; not written by gift_quant.save_quantized")
    out = {}
    for name, m in json.loads(meta["layers"]).items():
        missing = [f"{name}.{f}" for f in _FIELDS if f"{name}.{f}" not in tensors]
        if missing:
            raise CheckpointError(f"{path}: missing tensor {missing[0]}")
        t = {f: tensors[f"{name}.{f}"] for f in _FIELDS}
        out_f, in_f = t["codes"].shape
        n_groups = 1 if m["group_size"] == -1 else -(-in_f // m["group_size"])
        expected = {"scale": (out_f, n_groups), "zero": (out_f, n_groups), "salient_weight": (out_f, t["salient_idx"].numel())}
        for f, shape in expected.items():
            if tuple(t[f].shape) != shape:
                raise CheckpointError(f"{path}: tensor {name}.{f} has shape {tuple(t[f].shape)}, expected {shape}")
        if t["codes"].dtype != torch.uint8 or int(t["codes"].max()) >= 2 ** m["bits"]:
            raise CheckpointError(f"{path}: tensor {name}.codes is not {m['bits']}-bit uint8 codes")
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is not None:
            g_idx = check_g_idx(path, name, g_idx, in_f, t["scale"].shape[1])
        out[name] = QuantizedWeight(bits=m["bits"], group_size=m["group_size"], g_idx=g_idx, **t)
    return out
