"""The run layer under every analyzer that loops over images: batching, resume, torchrun, provenance.

An analysis is a per-batch ``step`` plus a reduction, in the style of pytorch-grad-cam's ``BaseCAM``
template. :func:`run_batches` does the rest:

- the model runs in eval mode with frozen parameters (no weight gradients), restored afterwards;
- images stream from a :class:`ImageDataset` through a ``DataLoader`` one batch at a time (unreadable
  files are skipped and counted, or raise with ``strict``);
- each output is declared once: :class:`ItemOutput` (one array per image, placed at its index) or
  :class:`SumOutput` (summed over images);
- with a :class:`RunStore` the state is saved atomically every ``save_every_s`` seconds and whenever
  the loop stops, by an error or Ctrl-C too; a rerun with the same :func:`run_key` (a content hash of
  the weights, the inputs, the options and the package version) resumes, any change starts afresh,
  and a finished run is reused as it is;
- under ``torchrun`` rank r takes batches r, r + world, ...; the outputs are all-reduced, so every
  rank returns the full result, and a failure on one rank stops every rank with a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .distributed import all_reduce_sum, raise_if_any_rank_failed, rank_and_world
from .errors import HpxError
from .images import ImageSource, read_rgb
from .results import model_metadata, to_jsonable

UNREAD, DONE, UNREADABLE = 0, 1, 2  # per-image status codes


# -- inputs --------------------------------------------------------------------------------------

class ImageDataset(Dataset):
    """Item i: (image (3, H, W) after ``transform`` or None when unreadable, label, i).

    images: image sources (read and transformed lazily, so only one batch is in memory) or a tensor
    (N, 3, H, W) already prepared. labels: one class index per image (default all 0).
    """

    def __init__(self, images: Union[Sequence[ImageSource], Tensor], transform: Optional[Callable] = None,
                 labels: Optional[Sequence[int]] = None) -> None:
        if not isinstance(images, Tensor) and transform is None:
            raise ValueError("image sources need a transform")
        self.images, self.transform = images, transform
        self.labels = list(labels) if labels is not None else [0] * len(images)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        """The image's name (file name relative to its folder, or ``tensor[i]``)."""
        return f"tensor[{index}]" if isinstance(self.images, Tensor) else self.images[index].name

    def __getitem__(self, index: int) -> Tuple[Optional[Tensor], int, int]:
        if isinstance(self.images, Tensor):
            return self.images[index], self.labels[index], index
        image = read_rgb(self.images[index])
        return (None if image is None else self.transform(image)), self.labels[index], index


@dataclass
class Batch:
    """Readable images (B, 3, H, W), their labels (B,) and dataset indices (B,); unreadable indices."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    skipped: List[int]


def collate_skipping(items: Sequence[Tuple[Optional[Tensor], int, int]]) -> Batch:
    """Stack the readable items of one batch and list the indices of the unreadable ones."""
    readable = [item for item in items if item[0] is not None]
    skipped = [item[2] for item in items if item[0] is None]
    if not readable:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([item[0] for item in readable]), torch.tensor([item[1] for item in readable]),
                 torch.tensor([item[2] for item in readable]), skipped)


# -- outputs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ItemOutput:
    """One array of ``shape`` per image; the step returns (B, *shape) for the batch's readable images."""

    shape: Tuple[int, ...] = ()
    dtype: str = "float64"


class SumOutput(ItemOutput):
    """An array of ``shape`` summed over images; the step returns the batch's sum."""


Step = Callable[[Batch], Mapping[str, Union[np.ndarray, Tensor]]]


@dataclass
class RunOutputs:
    """What :func:`run_batches` returns: ``arrays`` (items: (N, *shape), sums: shape), ``status`` (N,)
    (1 evaluated, 2 unreadable) and counts for the result's metadata."""

    arrays: Dict[str, np.ndarray]
    status: np.ndarray
    counts: Dict[str, int] = field(default_factory=dict)

    @property
    def evaluated(self) -> np.ndarray:
        """Boolean mask (N,) of the images the step saw."""
        return self.status == DONE

    @property
    def unreadable(self) -> List[int]:
        """Indices of the images that could not be read."""
        return np.flatnonzero(self.status == UNREADABLE).tolist()


def _empty(outputs: Mapping[str, ItemOutput], count: int) -> Dict[str, np.ndarray]:
    return {name: np.zeros(spec.shape if isinstance(spec, SumOutput) else (count, *spec.shape), dtype=spec.dtype)
            for name, spec in outputs.items()}


# -- the store -------------------------------------------------------------------------------------

def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): the weights' content."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_digest(images: Union[Sequence[Any], Tensor]) -> Any:
    """What identifies the inputs: a tensor's content hash, else the sources' names and paths."""
    if isinstance(images, Tensor):
        return hashlib.sha256(images.detach().float().cpu().numpy().tobytes()).hexdigest()
    return [[getattr(s, "name", str(s)), str(getattr(s, "path", "") or "")] for s in images]


def content_key(description: Any, length: int = 20) -> str:
    """Short SHA-256 of ``description`` (JSON-able) and the package version: the one key of every cached run
    and artefact, so a new release never reuses what an older one saved."""
    from . import __version__
    blob = json.dumps(to_jsonable({"version": __version__, "description": description}), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_key(model: nn.Module, inputs: Any, options: Mapping[str, Any]) -> str:
    """Content key of a run: model provenance and weights, inputs, options (and the package version)."""
    return content_key({"model": model_metadata(model), "weights": weights_digest(model), "inputs": inputs,
                        "options": dict(options)})


class RunStore:
    """Saved states of runs under ``root``: one ``.npz`` per (run key, rank, world size), written atomically."""

    def __init__(self, root: Union[Path, str]) -> None:
        self.root = Path(root)

    def path(self, key: str, rank: int, world: int) -> Path:
        return self.root / key / f"rank{rank}-of-{world}.npz"

    def load(self, key: str, rank: int, world: int) -> Optional[Dict[str, np.ndarray]]:
        """The saved state, or None when there is none (or it cannot be read)."""
        path = self.path(key, rank, world)
        if not path.is_file():
            return None
        try:
            with np.load(path) as saved:
                return {name: saved[name] for name in saved.files}
        except (OSError, ValueError):  # a truncated file from a crash mid-write of an older version
            return None

    def save(self, key: str, rank: int, world: int, state: Mapping[str, np.ndarray]) -> None:
        path = self.path(key, rank, world)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(temporary, **state)
        temporary.replace(path)


# -- the run -------------------------------------------------------------------------------------

@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and parameters without gradients inside; the previous state restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def run_batches(model: nn.Module, dataset: ImageDataset, step: Step, outputs: Mapping[str, ItemOutput], *,
                batch_size: int, store: Optional[RunStore] = None, key: Optional[str] = None,
                strict: bool = False, workers: int = 0, save_every_s: float = 60.0, desc: str = "",
                progress: bool = True) -> RunOutputs:
    """Run ``step`` over ``dataset`` in batches of ``batch_size`` and reduce its ``outputs`` (module docstring).

    The step gets a :class:`Batch` on the CPU with at least one readable image and returns every output
    (as numpy arrays or tensors). store and key: where the state is saved and under which
    :func:`run_key` (both or neither). strict: an unreadable image raises instead of being skipped.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise HpxError(f"batch size must be at least 1, got {batch_size}")
    if (store is None) != (key is None):
        raise ValueError("a run store needs a run key and a key needs a store")
    count = len(dataset)
    rank, world = rank_and_world()
    batches = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    mine = list(range(rank, len(batches), world))
    state = _empty(outputs, count)
    status = np.zeros(count, dtype=np.int64)
    saved = store.load(key, rank, world) if store is not None else None
    if saved is not None:
        state = {name: saved[name] for name in outputs}
        status = saved["status"]
    done = {b for b in mine if all(status[i] != UNREAD for i in batches[b])}
    todo = [b for b in mine if b not in done]

    def save() -> None:
        if store is not None:
            store.save(key, rank, world, {**state, "status": status})

    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in todo], collate_fn=collate_skipping,
                        num_workers=workers)
    failure: Optional[Exception] = None
    last_save = time.monotonic()
    bar = tqdm(total=len(mine), initial=len(done), desc=desc, unit="batch", disable=not progress or rank != 0)
    try:
        with analysis_mode(model):
            for batch in loader:
                if batch.skipped and strict:
                    raise HpxError(f"unreadable image {dataset.name(batch.skipped[0])} "
                                   "(drop --strict to skip such files)")
                if len(batch.indices):
                    _accumulate(state, outputs, batch.indices.numpy(), step(batch))
                status[batch.indices.numpy()], status[batch.skipped] = DONE, UNREADABLE
                bar.update(1)
                if time.monotonic() - last_save >= save_every_s:
                    save()
                    last_save = time.monotonic()
    except BaseException as err:  # save what is done; other ranks must hear of it, or they wait forever
        save()
        if world == 1 or not isinstance(err, Exception):
            raise
        failure = err
    finally:
        bar.close()
    save()
    raise_if_any_rank_failed(failure, device)
    names = list(outputs)
    *arrays, status_all, batch_counts = all_reduce_sum(
        [torch.from_numpy(state[name]) for name in names] + [torch.from_numpy(status), torch.tensor([len(done), len(todo)])],
        device)
    return RunOutputs(arrays={name: tensor.numpy() for name, tensor in zip(names, arrays)}, status=status_all.numpy(),
                      counts={"world_size": world, "batches_total": len(batches),
                              "batches_resumed": int(batch_counts[0]), "batches_computed": int(batch_counts[1])})


def _accumulate(state: Dict[str, np.ndarray], outputs: Mapping[str, ItemOutput], indices: np.ndarray,
                produced: Mapping[str, Union[np.ndarray, Tensor]]) -> None:
    """Place the step's item outputs at their indices and add its sums."""
    missing = set(outputs) - set(produced)
    if missing:
        raise ValueError(f"the step did not return {sorted(missing)}")
    for name, spec in outputs.items():
        value = produced[name]
        value = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if isinstance(spec, SumOutput):
            state[name] += value
        else:
            state[name][indices] = value


__all__ = ["ImageDataset", "Batch", "collate_skipping", "ItemOutput", "SumOutput", "RunOutputs", "RunStore",
           "weights_digest", "inputs_digest", "run_key", "analysis_mode", "run_batches"]
