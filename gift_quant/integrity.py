"""Checksums of what a run writes, and ``gift-quant verify``.

A flipped byte in a safetensors data section loads without complaint and gives a silently wrong
model; only a checksum catches it. Every stage records the sha256 of each file it wrote in its
``manifest.json`` (``files``). Every export folder carries its own ``SHA256SUMS`` (``sha256sum``'s format,
so ``sha256sum -c SHA256SUMS`` checks it too) and a ``gift`` export also records its weights' sha256 in its
``config.json`` (``quantization_config.sha256``): a folder copied away from its run, or uploaded, stays
checkable on its own, and the Hugging Face folder loads as it is.
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


SUMS = "SHA256SUMS"


def write_sums(folder: Path) -> None:
    """``folder/SHA256SUMS``: the sha256 of every other file below ``folder``, one ``<hash>  <path>`` line each."""
    folder = Path(folder)
    lines = "".join(f"{digest}  {rel}\n" for rel, digest in file_hashes(folder, skip=(SUMS, "manifest.json")).items())
    (folder / SUMS).write_text(lines)


def read_sums(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` from ``folder/SHA256SUMS``; a damaged line is named."""
    from .export import CheckpointError

    path = Path(folder) / SUMS
    sums = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise CheckpointError(f"{path}: line {n} is not '<sha256>  <relative path>'; the file is damaged")
        sums[rel.removeprefix("*")] = digest.lower()
    return sums


def require_sums(folder: Path) -> None:
    """Refuse an export folder whose files differ from its ``SHA256SUMS`` (a folder without one passes: older
    exports and plain model folders)."""
    from .export import CheckpointError

    if (Path(folder) / SUMS).is_file():
        problems = check_hashes(folder, read_sums(folder))
        if problems:
            raise CheckpointError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                  + f"; gift-quant verify {folder} lists them: copy or export the folder again")


def read_json(path: Path, fix: str = "the file is damaged") -> dict:
    """A JSON file (one the pipeline wrote, or a checkpoint's config or index); a damaged or unreadable one is
    named with ``fix``, what to do about it."""
    from .export import CheckpointError

    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None


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
