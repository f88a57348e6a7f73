"""Where a run computes and how much memory it took there.

``resolve`` turns the recipe's ``device`` (``auto | cpu | cuda | cuda:N``) into a ``torch.device``
and fails with the field named when the device is not there, before any weights load.
``capacity`` is what the memory plan compares its estimates against. ``peak`` measures a stage's
peak: on a GPU ``torch.cuda.max_memory_allocated`` (what the plan estimates: tensors, not the CUDA
context or the allocator's cache), on the CPU the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``), which also counts the interpreter and libraries; the C heap's free pages are
returned to the system first (``trim_heap``), or memory freed before the block and reused in it would not count.
"""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GiB = 2**30


class DeviceError(ValueError):
    """A device the recipe or command line names that this machine does not have."""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, field: str = "--capacity") -> int:
    """``24GiB``, ``80GB``, ``512MiB`` or a plain number of bytes, as an int."""
    number = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise DeviceError(f"{field} = {text!r}: expected a positive size such as 24GiB, 80GB or 512MiB")
    return int(value * _UNITS[unit])


def named(spec: str) -> torch.device:
    """The device ``spec`` names (``cpu``, ``cuda``, ``cuda:N``) whether or not this machine has it: for a plan
    of a machine one does not have. ``auto`` means what it means here."""
    if spec == "auto":
        return resolve(spec)
    return torch.device("cuda", int(spec.partition(":")[2] or 0)) if spec.startswith("cuda") else torch.device(spec)


def resolve(spec: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU; ``cuda``/``cuda:N`` must exist."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device = {spec!r}: this machine has no CUDA GPU (torch {torch.__version__}); "
                          f"use --device cpu (or device: auto); gift-quant plan ... --capacity SIZE plans for a GPU "
                          f"this machine lacks")
    index = int(spec.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device = {spec!r}: only {torch.cuda.device_count()} GPU(s), cuda:0 .. "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (a GPU runs ahead of the host: a timer read without this counts
    only the launches); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what a finished stage left: its models are often held only by reference cycles (accelerate binds a
    prepared model's ``forward`` to the model), which only the cycle collector frees, and on a GPU the allocator
    keeps freed blocks cached for this process alone. Without this a trained model stays on the device into the
    stages after it."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def capacity(device: torch.device) -> int:
    """Bytes a run may use on ``device``: the GPU's total memory, or the memory the OS has available."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: peak) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def trim_heap() -> None:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim``; nothing where the C library has
    none): the resident set then grows with what is allocated after, where it would reuse those pages unseen."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Peak:
    """What ``peak`` measured: bytes at the start, at the highest point, and the difference."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.peak = device, 0, 0

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


@contextmanager
def peak(device: torch.device, what: str = "") -> Iterator[Peak]:
    """Measure the peak memory of the block on ``device`` (see module docstring); log it when ``what``."""
    p = Peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        p.start = torch.cuda.memory_allocated(device)
    else:
        trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        p.start = _status_bytes("VmRSS")
    try:
        yield p
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            p.peak = torch.cuda.max_memory_allocated(device)
        else:
            p.peak = _status_bytes("VmHWM")
        if what:
            log.info("%s: peak %s memory %.2f GiB (%.2f GiB above the start)", what,
                     "GPU" if device.type == "cuda" else "process RSS", p.peak / GiB, p.added / GiB)
