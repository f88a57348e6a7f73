"""The run folder: one run at a time, stage folders written whole or not at all, each with a manifest.

A stage writes into a temporary sibling folder that replaces the stage folder in one rename when
it is complete, so a killed run leaves either the old stage or a ``.<stage>.tmp-*`` folder that the
next run removes, never a half-written stage. A lock on the folder keeps a second run out.

A stage's manifest holds the hash of the recipe sections it depends on: those it reads itself
(``Stage.reads``, declared where the stage is defined) and those of every stage before it. A rerun
skips a stage whose hash matches and refuses one whose recipe changed (``--from STAGE`` redoes it).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import gptq_checkpoint
from .checkpoint import CheckpointError, read_json, read_safetensors
from .integrity import check_hashes
from .sources import load_model

if TYPE_CHECKING:
    from .gptq_checkpoint import GPTQCheckpoint
    from .plan import Shape
    from .recipe import Recipe

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run folder cannot be used as it is: locked by another run, or holding a different recipe's work."""


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lock(folder: Path):
    """An exclusive lock on a run folder (``filelock``: the OS releases it when its process dies, so a
    killed run leaves no stale lock); a second run is refused at once, naming the holder."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    held, holder = FileLock(folder / ".lock", timeout=0), folder / ".lock.holder"
    try:
        held.acquire()
    except Timeout:
        who = holder.read_text().strip() if holder.exists() else "another process"
        raise RunError(f"run folder {folder} is in use by {who}; wait for it to finish, or set "
                          f"output_dir (or name) to another folder") from None
    holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return held


def remove_leftovers(folder: Path) -> None:
    """Temporary folders of a killed run (stages, training checkpoints) are removed; complete ones never."""
    for tmp in [*folder.glob(".*.tmp-*"), *folder.glob("*.work/checkpoints/.tmp-*"), *folder.glob("*.work/.*.tmp")]:
        log.info("removing %s, left by an interrupted run", tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    """Versions that can change a stage's result, recorded in its manifest."""
    import transformers

    from . import __version__

    return {"gift_quant": __version__, "torch": torch.__version__, "transformers": transformers.__version__}



# A stage that resumes mid-way (reconstruct: one file a block; generate: one a batch) keeps each finished piece in
# ``<run>/<stage>.work/`` as a safetensors file holding the stage key in its metadata, written under a temporary name
# and renamed. Training checkpoints are accelerate's folders instead (``train``), evaluation's lm-eval's SQLite cache.


def save_piece(path: Path, tensors: dict[str, torch.Tensor], key: str, **meta: str) -> None:
    """One finished piece of a stage's work, whole or not at all."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"key": key, **meta})
    os.replace(tmp, path)


def load_piece(path: Path, key: str, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A finished piece's tensors and metadata; None where there is none, or where it is damaged (named in the log and
    deleted: the stage redoes it). One of another recipe is refused."""
    if not path.exists():
        return None
    try:
        tensors, meta = read_safetensors(path, fix=REDO_PIECE)
    except CheckpointError as e:
        return _drop(path, e)
    _check_piece(path, meta.get("key", ""), key, stage)
    return tensors, meta


REDO_PIECE = "deleted, the stage redoes this piece"


def _drop(path: Path, e: CheckpointError) -> None:
    log.warning("%s", e)
    path.unlink()


def _check_piece(path: Path, saved: str, key: str, stage: str) -> None:
    if saved != key:
        raise RunError(f"{path} was written from a different recipe (the {stage} section or an earlier stage's); "
                       f"rerun with --from {stage} to start the stage again")


def piece_checker(stage: str) -> Callable[[Path, str], None]:
    """``Stage.check_work`` of a stage that keeps pieces: every piece in its work folder has the stage key."""
    def check(folder: Path, key: str) -> None:
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                meta = read_safetensors(path, keep=lambda _name: False, fix=REDO_PIECE)[1]
            except CheckpointError as e:
                _drop(path, e)
                continue
            _check_piece(path, meta.get("key", ""), key, stage)
    return check


def _always(_recipe: Recipe, _mode) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, all it declares in one place:

    - ``run(run, tmp, **kwargs) -> manifest extras`` writes its files into ``tmp`` (renamed into
      ``<run>/<name>/`` when it returns);
    - ``reads``: the recipe sections it reads itself (its key hashes them and those of the stages before it);
    - ``wanted(recipe, mode)``: whether a run of that recipe in that ``modes.Mode`` has the stage at all
      (``stages.ORDER`` says where it goes);
    - ``check_work(folder, key)``: for a stage that resumes from ``<run>/<name>.work/``, refuses a folder another
      recipe left (called before any stage runs);
    - ``plan(shape, recipe, device, capacity) -> {part: bytes}``: its expected peak memory (``plan.py``), and
      ``knob``, the recipe fields that lower it, for the refusal of a run that does not fit."""

    name: str
    reads: tuple[str, ...]
    run: Callable[..., dict]
    check_work: Callable[[Path, str], None] | None = None
    wanted: Callable[[Recipe, object], bool] = _always
    plan: Callable[[Shape, Recipe, torch.device, int], dict[str, int]] | None = None
    knob: str = ""


class Run:
    """A run folder, its stages in order and their manifests, and what the input checks found: ``imported``,
    the GPTQ checkpoint ``model.ref`` names if it is one; ``shape``, the model's shapes; ``mode``, the
    training setting (``modes.Mode``), chosen once."""

    def __init__(self, recipe: Recipe, stages: list[Stage], mode, device, imported: GPTQCheckpoint | None = None,
                 shape: Shape | None = None):
        self.recipe, self.stages, self.mode, self.device = recipe, stages, mode, device
        self.imported, self.shape = imported, shape
        self.dir = recipe.run_dir()

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def fmt(self) -> str:
        """GPTQ layout of the packed exports: the imported checkpoint's (its tensors stay bit-identical), else v1."""
        return self.imported.fmt if self.imported else "gptq"

    def stage(self, name: str) -> Path:
        return self.dir / name

    def lock(self):
        return lock(self.dir)

    def depends(self, name: str) -> tuple[str, ...]:
        """Recipe sections stage ``name`` depends on: its own and those of the stages before it."""
        upto = self.order.index(name) + 1
        used = {"model", "seed"}.union(*(s.reads for s in self.stages[:upto]))
        return tuple(sec for sec in type(self.recipe).model_fields if sec in used)  # the schema's order

    def key(self, name: str) -> str:
        """The hash stage ``name``'s manifest (and its training checkpoints) hold."""
        return self.recipe.digest(*self.depends(name))

    def is_done(self, name: str, full: bool = True) -> bool:
        """Whether stage ``name`` finished with this recipe; with ``full``, its files are also checked against
        their recorded sha256 and a change of package versions since is logged."""
        manifest = self.stage(name) / "manifest.json"
        if not manifest.exists():
            return False
        saved = read_json(manifest)
        if saved.get("key") != self.key(name):
            raise RunError(
                f"stage '{name}' in {self.dir} was run with a different recipe (sections "
                f"{', '.join(self.depends(name))}); "
                f"rerun with --from {name} to redo it, or set output_dir to a new folder")
        if not full:
            return True
        problems = check_hashes(self.stage(name), saved.get("files", {}))
        if problems:
            raise CheckpointError(f"stage '{name}': {problems[0]}; rerun with --from {name}")
        now = versions()
        changed = {k: (v, now.get(k)) for k, v in saved.get("versions", {}).items() if now.get(k) != v}
        if changed:
            log.warning("stage %s was run with other package versions (then, now): %s", name, changed)
        return True

    def manifest(self, name: str, seconds: float, files: dict[str, str], extra: dict | None = None) -> dict:
        return {"stage": name, "key": self.key(name), "seconds": seconds, "versions": versions(), "files": files,
                **(extra or {})}

    def load_fp(self):
        """``(model, tokenizer)`` the run starts from: the full-precision model; for an imported checkpoint,
        ``model.full_precision`` or, without it, the checkpoint dequantized."""
        r = self.recipe.model
        if self.imported and r.full_precision is None:
            return self.load_imported()[:2]
        return load_model(r.full_precision or r.ref, getattr(torch, r.dtype), r.trust_remote_code)

    def load_imported(self):
        """``(model, tokenizer, layers)`` of the imported checkpoint (see ``gptq_checkpoint.load``)."""
        r = self.recipe.model
        return gptq_checkpoint.load(self.imported, getattr(torch, r.dtype), r.trust_remote_code)
