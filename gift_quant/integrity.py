"""Checksums of what a run writes, and ``gift-quant verify``.

A flipped byte in a safetensors data section loads without complaint and gives a silently wrong
model; only a checksum catches it. Every stage records the sha256 of each file it wrote in its
``manifest.json`` (``files``), and a ``gift`` export also in its own ``config.json``
(``quantization_config.sha256``), so the folder stays checkable after it is copied away from its run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path, skip: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    """``relative path -> sha256`` of every file below ``folder`` (``skip``: names left out)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def check_hashes(folder: Path, recorded: dict[str, str]) -> list[str]:
    """Problems of ``folder`` against ``recorded`` hashes: files missing or changed (one line each)."""
    problems = []
    for rel, digest in recorded.items():
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256(path) != digest:
            problems.append(f"{path}: sha256 differs from the one recorded when it was written (damaged or edited)")
    return problems


def read_json(path: Path) -> dict:
    """A JSON file the pipeline wrote; a damaged one is named."""
    from .export import CheckpointError

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged") from None


def verify(path: Path) -> list[str]:
    """Everything wrong with a run folder, a stage folder or an export folder (empty: all good)."""
    from .export import CheckpointError
    from .gift_format import verify_gift

    path = Path(path)
    if not path.is_dir():
        return [f"{path}: no such folder"]
    problems: list[str] = []
    manifests = [path / "manifest.json"] if (path / "manifest.json").exists() else sorted(path.glob("*/manifest.json"))
    for m in manifests:
        try:
            problems += check_hashes(m.parent, read_json(m).get("files", {}))
        except CheckpointError as e:
            problems.append(str(e))
    gifts = [p.parent for p in path.rglob("config.json") if _is_gift(p)]
    for g in gifts:
        problems += verify_gift(g)
    if not manifests and not gifts:
        problems.append(f"{path}: neither a run, a stage nor a gift export folder (no manifest.json, no gift config.json)")
    return problems


def _is_gift(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "gift"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False
