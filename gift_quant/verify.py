"""``gift-quant verify``: everything wrong with a run, stage or export folder, one line each.

It sits above every format: stage manifests and ``SHA256SUMS`` are checked by their recorded sha256, and a folder of
a format that checks more (``Format.verify``: a ``gift`` folder is loaded the way a user loads it, missing tensors,
bad indices, scales) is checked that way too.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, read_json
from .formats import of_folder
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
    checked = [(p.parent, of_folder(p.parent)) for p in path.rglob("config.json")]
    checked = [(folder, fmt) for folder, fmt in checked if fmt.verify is not None]
    for folder, fmt in checked:
        problems += fmt.verify(folder)
    if not manifests and not checked and not exports:
        problems.append(f"{path}: neither a run, a stage nor an export folder (no manifest.json, no {SUMS}, no gift "
                        f"config.json)")
    return problems

