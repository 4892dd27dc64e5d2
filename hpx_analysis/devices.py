"""Device selection shared by the library and the CLI, and the host-memory policy of runs on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import platform
from typing import Optional

import torch

from .errors import HpxError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HpxError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise HpxError(f"unsupported device '{name}'; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HpxError(f"device '{name}' requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HpxError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s): "
                       f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def model_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (else its first buffer; CPU float32 for a model with
    neither, e.g. a function wrapped as a module)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):  # stops at the first floating one
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_MEMORY_ENV = "HPX_KEEP_FREED_MEMORY"
"""Set to 0 and :func:`keep_freed_memory` leaves glibc's malloc as it is (the command line calls it at start)."""


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (whose ``mallopt`` parameters are used here), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """From now on memory freed by tensors stays in this process for the next allocation instead of going back to
    the operating system (glibc only; the CPU analogue of torch's CUDA caching allocator). Returns whether it applied.

    glibc maps every allocation above its mmap threshold (at most 32 MB) afresh and unmaps it on free, so each
    new large tensor is page-faulted in again: a 1024 px pass allocates 50-67 MB activations and gradients, and a
    multiplication over a new 67 MB tensor takes about 4x as long as over a reused one. After this call nothing
    is mapped or trimmed (``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` unbounded): the heap grows over the first two or
    three images (a 64-byte aligned request does not always fit the free chunk an earlier one left) and then
    serves every pass from kept pages (the ERF pass of ``hpx_former_s18`` at 1024 px: no page faults from the
    fourth image on, heap steady at 5.0 GB; the ``kept`` rows of ``benchmarks/erf.py``: the analyzer 3-10%
    faster, a plain loop 16-20%). The process keeps its peak memory until it exits or calls
    :func:`release_freed_memory`. The command line calls this at start; a no-op off glibc or with
    ``HPX_KEEP_FREED_MEMORY=0``."""
    libc = _glibc() if os.environ.get(KEEP_MEMORY_ENV, "1") != "0" else None
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def release_freed_memory() -> None:
    """Give the free part of the heap back to the operating system (glibc ``malloc_trim``); a no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
