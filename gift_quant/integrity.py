"""Checksums of what a run writes (``gift-quant verify`` reads them: ``verify``).

A flipped byte in a safetensors data section loads without complaint and gives a silently wrong
model; only a checksum catches it. Every stage records the sha256 of each file it wrote in its
``manifest.json`` (``files``). Every export folder carries its own ``SHA256SUMS`` (``sha256sum``'s format,
so ``sha256sum -c SHA256SUMS`` checks it too) and a ``gift`` export also records its weights' sha256 in its
``config.json`` (``quantization_config.sha256``): a folder copied away from its run, or uploaded, stays
checkable on its own, and the Hugging Face folder loads as it is.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .checkpoint import CheckpointError


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
    if (Path(folder) / SUMS).is_file():
        problems = check_hashes(folder, read_sums(folder))
        if problems:
            raise CheckpointError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                  + f"; gift-quant verify {folder} lists them: copy or export the folder again")
