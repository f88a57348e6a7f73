"""Run-folder I/O: one run at a time, stage folders written whole or not at all.

A stage writes into a temporary sibling folder that replaces the stage folder in one rename when
it is complete, so a killed run leaves either the old stage or a ``.<stage>.tmp-*`` folder that the
next run removes, never a half-written stage. A lock on the folder keeps a second run out.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


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

    from .recipe import RecipeError

    folder.mkdir(parents=True, exist_ok=True)
    held, holder = FileLock(folder / ".lock", timeout=0), folder / ".lock.holder"
    try:
        held.acquire()
    except Timeout:
        who = holder.read_text().strip() if holder.exists() else "another process"
        raise RecipeError(f"run folder {folder} is in use by {who}; wait for it to finish, or set "
                          f"output_dir (or name) to another folder") from None
    holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return held


def remove_leftovers(folder: Path) -> None:
    """Temporary folders of a killed run (stages, training checkpoints) are removed; complete ones never."""
    for tmp in [*folder.glob(".*.tmp-*"), *folder.glob("*.work/checkpoints/.tmp-*")]:
        log.info("removing %s, left by an interrupted run", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions that can change a stage's result, recorded in its manifest."""
    import torch
    import transformers

    from . import __version__

    return {"gift_quant": __version__, "torch": torch.__version__, "transformers": transformers.__version__}

