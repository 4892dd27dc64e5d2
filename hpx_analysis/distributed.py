"""``torchrun`` plumbing shared by the analyzers: joining the process group (:func:`session`), this process's rank,
summing over ranks, and stopping every rank when one fails.

Without ``torchrun`` (WORLD_SIZE unset or 1) every function is the single-process no-op: rank 0 of a
world of 1, sums are the tensors themselves, and a failure is raised where it happened.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import HpxError


def backend_for(device: torch.device, local_world: int) -> str:
    """nccl when every local rank has a GPU of its own, else gloo (CPU, or several ranks sharing one GPU, which
    nccl refuses)."""
    return "nccl" if device.type == "cuda" and torch.cuda.device_count() >= local_world else "gloo"


def setup(device: torch.device) -> Tuple[torch.device, int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group (:func:`backend_for`) and use this rank's GPU
    (local rank modulo the GPUs there are); returns (device, rank, world size), (device, 0, 1) otherwise."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend_for(device, local_world))
    return (device, *rank_and_world())


def teardown() -> None:
    """Leave the process group joined by :func:`setup` (nothing when not distributed)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Tuple[torch.device, int, int]]:
    """:func:`setup` for the body, :func:`teardown` however it ends: ``with session(device) as (device, rank, world):``.
    Keep ``rank`` for after the block, where only rank 0 writes (the process group is gone by then)."""
    joined = setup(device)
    try:
        yield joined
    finally:
        teardown()


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of this process in the joined process group; (0, 1) when not distributed."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device(device: torch.device) -> torch.device:
    """Where collectives run: ``device`` under nccl, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: Sequence[Tensor], device: torch.device) -> List[Tensor]:
    """Element-wise sums over all ranks, on the CPU, reduced on ``device`` under nccl and on the CPU under gloo (the
    tensors themselves when not distributed)."""
    if not dist.is_initialized():
        return list(tensors)
    reduced = []
    for tensor in tensors:
        moved = tensor.to(_collective_device(device))
        dist.all_reduce(moved)
        reduced.append(moved.cpu())
    return reduced


def raise_if_any_rank_failed(failure: Optional[Exception], device: torch.device) -> None:
    """Re-raise this rank's error, or stop this rank with a one-line error when another rank failed
    (every rank calls this once, so no rank is left waiting in a collective)."""
    if not dist.is_initialized():
        if failure is not None:
            raise failure
        return
    failed = torch.tensor([0 if failure is None else 1 + dist.get_rank()], device=_collective_device(device))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if failed.item():
        raise HpxError(f"rank {int(failed.item()) - 1} failed (its error is printed above); "
                       f"partial results are kept for a resumed run")
