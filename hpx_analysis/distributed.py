"""``torchrun`` plumbing shared by the analyzers: joining the process group (:func:`session`), this process's rank,
summing over ranks, and stopping every rank when one fails.

Without ``torchrun`` (WORLD_SIZE unset or 1) every function is the single-process no-op: rank 0 of a
world of 1, sums are the tensors themselves, and a failure is raised where it happened.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import HpxError

T = TypeVar("T")


def backend_for(device: torch.device, local_world: int) -> str:
    """The backend for ``local_world`` ranks on this node asking for ``device``: nccl when every rank gets a GPU of its
    own (``cuda`` without an index and at least as many GPUs as ranks, or a single rank), else gloo (CPU, or ranks
    sharing one GPU, fewer GPUs than ranks or a fixed ``cuda:N``, which nccl refuses as duplicate GPUs)."""
    if device.type != "cuda":
        return "gloo"
    own_gpus = local_world == 1 or (device.index is None and torch.cuda.device_count() >= local_world)
    return "nccl" if own_gpus else "gloo"


def setup(device: torch.device) -> Tuple[torch.device, int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group (:func:`backend_for`) and use this rank's GPU
    (``cuda``: local rank modulo the GPUs there are; ``cuda:N``: that one); returns (device, rank, world size),
    (device, 0, 1) otherwise."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        backend = backend_for(device, local_world)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
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


def computed_on_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 only, its value (picklable) sent to every rank: work every rank would repeat, such as
    hashing the input files into one shared digest cache, whose writes would otherwise queue behind one another's
    lock. An error on rank 0 stops every rank (HpxError there with its message); ``compute()`` itself when not
    distributed."""
    if not dist.is_initialized():
        return compute()
    error: Optional[Exception] = None
    message: List[object] = [None]
    if dist.get_rank() == 0:
        try:
            message = [("value", compute())]
        except Exception as err:  # the other ranks wait in the broadcast: they hear of it and stop too
            error, message = err, [("error", f"rank 0 failed: {err}")]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    kind, payload = message[0]
    if kind == "error":
        raise HpxError(str(payload))
    return payload
