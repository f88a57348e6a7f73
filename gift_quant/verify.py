"""``gift-quant verify``: everything wrong with a run, stage or export folder, one line each.

It sits above every format: stage manifests and ``SHA256SUMS`` are checked by their recorded sha256, and a
``gift`` folder is also loaded the way a user loads it (missing tensors, bad indices, scales).
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import CheckpointError, read_json
from .gift_format import verify_gift
from .integrity import SUMS, check_hashes, read_sums


def verify(path: Path) -> list[str]:
    """Everything wrong with a run folder, a stage folder or an export folder (empty: all good)."""
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
    exports = sorted(p.parent for p in path.rglob(SUMS))
    for folder in exports:
        try:
            problems += check_hashes(folder, read_sums(folder))
        except CheckpointError as e:
            problems.append(str(e))
    gifts = [p.parent for p in path.rglob("config.json") if is_gift_folder(p.parent)]
    for g in gifts:
        problems += verify_gift(g)
    if not manifests and not gifts and not exports:
        problems.append(f"{path}: neither a run, a stage nor an export folder (no manifest.json, no {SUMS}, no gift "
                        f"config.json)")
    return problems


def is_gift_folder(folder: Path) -> bool:
    """Whether ``folder``'s config.json says ``quant_method: gift`` (an unreadable config is not one)."""
    try:
        qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
        return qc.get("quant_method") == "gift"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False
