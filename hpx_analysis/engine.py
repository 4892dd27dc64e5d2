"""The run layer under every analyzer that loops over images: batching, resume, torchrun, provenance.

An analysis is a per-batch ``step`` plus a reduction, in the style of pytorch-grad-cam's ``BaseCAM``
template. :func:`run_batches` does the rest:

- the model runs in eval mode with frozen parameters (no weight gradients), restored afterwards;
- images stream from a :class:`ImageDataset` through a ``DataLoader`` one batch at a time (unreadable
  files are skipped and counted, or raise with ``strict``);
- each output is declared once: :class:`ItemOutput` (one array per image, placed at its index) or
  :class:`SumOutput` (summed over images);
- with a ``resume_dir`` the state is kept in a :class:`RunStore` under a run key (:func:`run_key`) that names
  everything the outputs depend on: the model's provenance, every parameter and buffer, the kernels of any
  active kernel modification or override, the bytes of every input image and its label, the preprocessing, the
  analysis' options, the code of this package, the torch / timm / captum versions, the device type and dtype.
  A rerun with the same key resumes (a finished run is reused, and both are announced); any change gives
  another key and starts afresh;
- a batch's sums and the status of its images are committed together, as one swap of the state object, so an
  interrupt at any instant leaves the state before the batch or after it, never half of it; the state is saved
  atomically (temporary file, fsync, ``os.replace``) every ``save_every_s`` seconds and whenever the loop stops,
  by an error or Ctrl-C too; a lock keeps a second process with the same key waiting until the first is done;
  a damaged saved state is moved aside and the run starts afresh;
- under ``torchrun`` rank r takes batches r, r + world, ...; the outputs are all-reduced, so every
  rank returns the full result, and a failure on one rank stops every rank with a one-line error.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .devices import model_placement
from .distributed import all_reduce_sum, computed_on_rank0, raise_if_any_rank_failed, rank_and_world
from .errors import HpxError
from .images import ImageLike, as_image_sources, read_rgb
from .models.long_filters import LongFilterBase
from .models.native import description as native_kernels
from .provenance import KEYED_LIBRARIES, checked_code_fingerprint, library_versions, package_version
from .results import model_metadata, to_jsonable
from .storage import FileLock, atomic_output, move_aside, remove_stale_temporaries

UNREAD, DONE, UNREADABLE = 0, 1, 2  # per-image status codes
SAVE_EVERY_S = 60.0
"""Default seconds between periodic saves of a run's state (it is saved whenever the loop stops, too)."""


# -- inputs --------------------------------------------------------------------------------------

_DESCRIBED_TRANSFORMS = ("torchvision.transforms.", "timm.data.", "hpx_analysis.")
"""Modules whose transform classes are described by their state (:func:`describe_transform`)."""
_PROCESS = uuid.uuid4().hex
"""This process, in descriptions of callables that cannot be described."""


def describe_transform(transform: Optional[Callable]) -> Any:
    """What decides a transform's output, as JSON: a ``Compose``'s parts in order; a transform class of torchvision,
    timm or this package (``Lambda`` aside) by its class and public attributes at full precision (tensors as lists:
    their repr rounds to 4 decimals); any other callable (a function, a ``Lambda``) by its identity in this process,
    so a run with it is reused in this process only, never by another whose callable merely prints the same."""
    if transform is None:
        return None
    kind = type(transform)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if kind.__name__ == "Compose" and isinstance(getattr(transform, "transforms", None), (list, tuple)):
        return {name: [describe_transform(part) for part in transform.transforms]}
    if kind.__module__.startswith(_DESCRIBED_TRANSFORMS) and kind.__name__ != "Lambda":
        state = {key: value for key, value in vars(transform).items() if not key.startswith("_") and key != "training"}
        return {name: {key: _exact(value) for key, value in state.items()}}
    return {name: f"object {id(transform)} of process {_PROCESS}"}


def _exact(value: Any) -> Any:
    """A transform attribute for :func:`describe_transform`: tensors and arrays as lists, enums by name."""
    if isinstance(value, Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [_exact(item) for item in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


class ImageDataset(Dataset):
    """Item i: (image (3, H, W) after ``transform`` or None when unreadable, label, i).

    images: image sources, paths, PIL images or arrays (:data:`..images.ImageLike`; read and transformed lazily, so
    only one batch is in memory) or a tensor (N, 3, H, W) already prepared. labels: one class index per image
    (default all 0).
    """

    def __init__(self, images: Union[Sequence[ImageLike], Tensor], transform: Optional[Callable] = None,
                 labels: Optional[Sequence[int]] = None) -> None:
        if not isinstance(images, Tensor) and transform is None:
            raise ValueError("image sources need a transform")
        self.images = images if isinstance(images, Tensor) else as_image_sources(images)
        self.transform = transform
        self.labels = list(labels) if labels is not None else [0] * len(images)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        """The image's name (file name relative to its folder, or ``tensor[i]``)."""
        return f"tensor[{index}]" if isinstance(self.images, Tensor) else self.images[index].name

    def content_digest(self, digests: Optional["DigestCache"] = None) -> str:
        """SHA-256 of what the dataset yields: every image's bytes (a tensor's values and shape, a file's bytes
        through ``digests``, an in-memory array's pixels), the labels and the transform's description."""
        digest = hashlib.sha256()
        if isinstance(self.images, Tensor):
            digest.update(tensor_digest(self.images).encode())
        else:
            digests = digests or DigestCache(None)
            for source in self.images:
                digest.update((digests.file(source.path) if source.array is None else array_digest(source.array))
                              .encode())
            digests.commit()
        digest.update(json.dumps({"labels": self.labels, "transform": describe_transform(self.transform)},
                                 sort_keys=True).encode())
        return digest.hexdigest()

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
    (1 evaluated, 2 unreadable), counts for the result's metadata and the run ``key`` (None without a store)."""

    arrays: Dict[str, np.ndarray]
    status: np.ndarray
    counts: Dict[str, int] = field(default_factory=dict)
    key: Optional[str] = None

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


# -- keys ----------------------------------------------------------------------------------------

def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and values."""
    data = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{data.dtype}:{data.shape}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


class DigestCache:
    """SHA-256 of input files, remembered in an SQLite file per (path, size, mtime_ns, ctime_ns, inode), so an
    unchanged 50,000-image folder is read once, not on every rerun; ``path`` None remembers nothing.

    A file whose mtime or ctime lies within ``RACY_S`` seconds of the moment it was hashed is not remembered: a
    write in the same clock tick could leave size and times unchanged (git's "racily clean" rule). Any change of
    size, times or inode (a replaced file) gives another entry, and a rewrite changes the ctime even when the mtime
    is set back, so a changed file is always hashed again.
    """

    RACY_S = 2.0

    def __init__(self, path: Optional[Path]) -> None:
        self._db: Optional[sqlite3.Connection] = None
        if path is not None:
            try:
                self._db = self._open(path)
            except sqlite3.DatabaseError as err:  # a damaged cache only costs re-hashing: set it aside
                move_aside(path, f"digest cache: {err}")
                self._db = self._open(path)
        self.hashed = 0  # files read in this process

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), timeout=60)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, size INTEGER, mtime_ns INTEGER, ctime_ns "
                       "INTEGER, inode INTEGER, sha256 TEXT, PRIMARY KEY (path, size, mtime_ns, ctime_ns, inode))")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def file(self, path: Optional[Path]) -> str:
        """The file's SHA-256 (``"missing"`` for a file that cannot be opened)."""
        try:
            stat = os.stat(path)
        except (OSError, TypeError):
            return "missing"
        row = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        if self._db is not None:
            found = self._db.execute("SELECT sha256 FROM digests WHERE path=? AND size=? AND mtime_ns=? AND "
                                     "ctime_ns=? AND inode=?", row).fetchone()
            if found:
                return found[0]
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            return "missing"
        self.hashed += 1
        newest = max(stat.st_mtime_ns, stat.st_ctime_ns)
        if self._db is not None and time.time_ns() - newest > self.RACY_S * 1e9:
            self._db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", (*row, digest.hexdigest()))
        return digest.hexdigest()

    def commit(self) -> None:
        """Write the digests found since the last commit (one transaction)."""
        if self._db is not None:
            self._db.commit()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): the weights' content."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b":" + tensor_digest(tensor).encode())
    return digest.hexdigest()


@torch.no_grad()
def kernel_edits_digest(model: nn.Module) -> Optional[str]:
    """SHA-256 of the kernel every long filter applies now where a kernel modification or override is active
    (``interventions.modify_kernels``, ``interventions.truncate_kernels``, ``override_kernel``), by module path; None when
    no filter of the model is modified. The kernels themselves are hashed, so two modifications that give the same
    kernels share a key and any other one does not."""
    edited = [(name, module) for name, module in model.named_modules()
              if isinstance(module, LongFilterBase) and module.active]
    if not edited:
        return None
    digest = hashlib.sha256()
    for name, module in edited:
        digest.update(name.encode() + b":" + tensor_digest(module.kernel()).encode())
    return digest.hexdigest()


KEYED_VARIABLES = ("NVIDIA_TF32_OVERRIDE", "TIMM_FUSED_ATTN")
"""Environment variables that change the numbers: TF32 forced on or off in cuBLAS and cuDNN; timm's fused attention."""


def environment(model: nn.Module) -> Dict[str, Any]:
    """What computes a run besides the model and code: the versions of :data:`KEYED_LIBRARIES`, the model's device
    type and parameter dtype, torch's float32 matmul precision, on CUDA whether convolutions and matmuls may round
    float32 to TF32 (cuDNN's default: yes; it moves results by about 1e-3), on the CPU which native kernels compute
    (or ``"off"``: :func:`.models.native.description`; they move results by float32 rounding; off the CPU they never
    run, so nothing is compiled for such a run), and :data:`KEYED_VARIABLES` that are set."""
    parameter = next(model.parameters(), None)
    device = parameter.device.type if parameter is not None else "cpu"
    described = {"libraries": library_versions(KEYED_LIBRARIES), "device": device,
                 "dtype": str(parameter.dtype) if parameter is not None else None,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device == "cuda":
        described["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    if device == "cpu":
        described["native kernels"] = native_kernels()
    described["variables"] = {name: os.environ[name] for name in KEYED_VARIABLES if name in os.environ}
    return described


def content_key(description: Any, length: int = 20) -> str:
    """Short SHA-256 of ``description`` (JSON-able), the package version and the code fingerprint
    (:mod:`.provenance`): the one key of every cached run and artefact, so changed code never reuses what other
    code saved."""
    blob = json.dumps(to_jsonable({"version": package_version(), "code": checked_code_fingerprint(),
                                   "description": description}, nonfinite_as_text=True), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_key(model: nn.Module, inputs: str, options: Mapping[str, Any]) -> str:
    """Content key of a run (module docstring): model provenance, weights, kernel edits, environment, the inputs'
    digest (:meth:`ImageDataset.content_digest`) and the options, with the version and code (:func:`content_key`)."""
    return content_key({"model": model_metadata(model), "weights": weights_digest(model),
                        "kernel_edits": kernel_edits_digest(model), "environment": environment(model),
                        "inputs": inputs, "options": dict(options)})


# -- the store -------------------------------------------------------------------------------------

STORE_FORMAT = 2
"""Layout of a saved run state; a state of another layout is moved aside."""


@dataclass(frozen=True)
class RunState:
    """A run's state: the outputs (items (N, *shape), sums shape) and the status (N,) of every image. One object,
    replaced as a whole, so what is saved is always a state between batches. Item rows of images whose status is
    UNREAD hold no meaning (a batch may have written them before it was committed)."""

    arrays: Dict[str, np.ndarray]
    status: np.ndarray

    @classmethod
    def empty(cls, outputs: Mapping[str, ItemOutput], count: int) -> "RunState":
        return cls(_empty(outputs, count), np.zeros(count, dtype=np.int64))

    def committed(self, outputs: Mapping[str, ItemOutput], indices: np.ndarray, skipped: Sequence[int],
                  produced: Mapping[str, Union[np.ndarray, Tensor]]) -> "RunState":
        """The state after one batch: its item outputs placed at ``indices``, its sums added, its images marked
        done and its unreadable ones (``skipped``) marked so. Sums and status are new arrays; item rows are
        written in place (they count only once their status is set)."""
        arrays = dict(self.arrays)
        missing = set(outputs) - set(produced)
        if len(indices) and missing:
            raise ValueError(f"the step did not return {sorted(missing)}")
        for name, spec in outputs.items() if len(indices) else ():
            value = produced[name]
            value = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            if isinstance(spec, SumOutput):
                arrays[name] = arrays[name].copy()
                arrays[name] += value
            else:
                arrays[name][indices] = value
        status = self.status.copy()
        status[indices], status[list(skipped)] = DONE, UNREADABLE
        return RunState(arrays, status)


class RunStore:
    """Saved states of runs under ``root``: ``<key>/rank<r>-of-<w>.npz`` per (run key, rank, world size), each
    written atomically and guarded by a lock file beside it; ``digests.sqlite`` remembers input files' digests."""

    def __init__(self, root: Union[Path, str]) -> None:
        self.root = Path(root)

    def path(self, key: str, rank: int, world: int) -> Path:
        return self.root / key / f"rank{rank}-of-{world}.npz"

    def digests(self) -> DigestCache:
        """The digest cache of this store's input files."""
        return DigestCache(self.root / "digests.sqlite")

    def lock(self, key: str, rank: int, world: int) -> FileLock:
        """The lock of one saved state: held by the run that computes it."""
        path = self.path(key, rank, world)
        return FileLock(path.with_suffix(".lock"), what=f"run {self.root / key} (rank {rank} of {world})")

    def load(self, key: str, rank: int, world: int, outputs: Mapping[str, ItemOutput],
             count: int) -> Optional[RunState]:
        """The saved state, or None when there is none. A state that cannot be read or does not fit (empty,
        truncated, garbage, another key, another layout, wrong shapes) is moved aside (:func:`..storage.move_aside`,
        one warning line) and None returned. Call while holding :meth:`lock`."""
        path = self.path(key, rank, world)
        remove_stale_temporaries(path)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                arrays = {name: saved[name] for name in saved.files}
            expected = RunState.empty(outputs, count)
            problem = _misfit(arrays, key, expected)
        except Exception as err:  # noqa: BLE001 - whatever a damaged file raises (EOFError, BadZipFile, ...)
            problem = f"unreadable: {type(err).__name__}: {' '.join(str(err).split())}"
        if problem:
            move_aside(path, problem)
            return None
        return RunState({name: arrays[name] for name in outputs}, arrays["status"])

    def save(self, key: str, rank: int, world: int, state: RunState) -> None:
        """Write ``state`` atomically and durably (:func:`..storage.atomic_output`)."""
        with atomic_output(self.path(key, rank, world)) as handle:
            np.savez(handle, **state.arrays, status=state.status, __key__=np.array(key),
                     __format__=np.array(STORE_FORMAT))


def _misfit(arrays: Mapping[str, np.ndarray], key: str, expected: RunState) -> str:
    """Why saved ``arrays`` are not a state of run ``key`` shaped like ``expected`` ("" when they are)."""
    if "__format__" not in arrays or int(arrays["__format__"]) != STORE_FORMAT:
        return "written by another version of hpx-analysis"
    if str(arrays.get("__key__", "")) != key:
        return f"it belongs to run {arrays.get('__key__')}, not {key}"
    for name, want in {**expected.arrays, "status": expected.status}.items():
        have = arrays.get(name)
        if have is None or have.shape != want.shape or have.dtype != want.dtype:
            return f"its '{name}' is missing or has another shape or dtype"
    if not np.isin(arrays["status"], (UNREAD, DONE, UNREADABLE)).all():
        return "its status holds unknown codes"
    return ""


def announce(message: str) -> None:
    """One line on stderr from rank 0 (every process when not distributed)."""
    if rank_and_world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


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


@dataclass
class _Resume:
    """Where a run's state lives: its store, key, rank and world size."""

    store: RunStore
    key: str
    rank: int
    world: int

    def save(self, state: RunState) -> None:
        self.store.save(self.key, self.rank, self.world, state)


def run_batches(model: nn.Module, dataset: ImageDataset, step: Step, outputs: Mapping[str, ItemOutput], *,
                batch_size: int, resume_dir: Optional[Union[Path, str]] = None,
                identity: Optional[Mapping[str, Any]] = None, strict: bool = False, workers: int = 0,
                save_every_s: Optional[float] = None, desc: str = "", progress: bool = True) -> RunOutputs:
    """Run ``step`` over ``dataset`` in batches of ``batch_size`` and reduce its ``outputs`` (module docstring).

    The step gets a :class:`Batch` on the CPU with at least one readable image and returns every output
    (as numpy arrays or tensors). resume_dir: keep the run's state in a :class:`RunStore` there, under the
    :func:`run_key` of the model, the dataset's content and ``identity`` (the analysis' name and every option that
    shapes its outputs), so a rerun resumes or reuses it; None computes afresh and saves nothing. strict: an
    unreadable image raises instead of being skipped. save_every_s: seconds between periodic saves (default
    :data:`SAVE_EVERY_S`).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise HpxError(f"batch size must be at least 1, got {batch_size}")
    count = len(dataset)
    rank, world = rank_and_world()
    batches = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    mine = list(range(rank, len(batches), world))
    resume = None
    if resume_dir is not None:
        store = RunStore(resume_dir)
        inputs = computed_on_rank0(lambda: dataset.content_digest(store.digests()))
        key = run_key(model, inputs, dict(identity or {}, batch_size=batch_size))
        resume = _Resume(store, key, rank, world)
    with (resume.store.lock(resume.key, rank, world) if resume else contextlib.nullcontext()):
        saved = resume.store.load(resume.key, rank, world, outputs, count) if resume else None
        state = saved or RunState.empty(outputs, count)
        done = {b for b in mine if all(state.status[i] != UNREAD for i in batches[b])}
        if resume and done:
            where = resume.store.root / resume.key
            announce(f"reusing the finished run {where} ({len(done)} of {len(mine)} batches)" if len(done) == len(mine)
                     else f"resuming the run {where}: {len(done)} of {len(mine)} batches done, computing the rest")
            announce("  (to recompute: --no-resume on the command line, resume_dir=None in Python)")
        todo = [b for b in mine if b not in done]
        skipped_before = np.flatnonzero(state.status == UNREADABLE)
        if strict and len(skipped_before):  # a run saved without --strict skipped it: --strict stops here too
            failure: Optional[Exception] = HpxError(
                f"unreadable image {dataset.name(int(skipped_before[0]))} in the saved run (drop --strict to skip "
                "such files)")
        else:
            state, failure = _loop(model, dataset, step, outputs, [batches[b] for b in todo], state, resume, strict,
                                   workers, SAVE_EVERY_S if save_every_s is None else save_every_s,
                                   tqdm(total=len(mine), initial=len(done), desc=desc, unit="batch",
                                        disable=not progress or rank != 0))
    device = model_placement(model)[0]
    raise_if_any_rank_failed(failure, device)
    names = list(outputs)
    *arrays, status_all, batch_counts = all_reduce_sum(
        [torch.from_numpy(state.arrays[name]) for name in names]
        + [torch.from_numpy(state.status), torch.tensor([len(done), len(todo)])], device)
    return RunOutputs(arrays={name: tensor.numpy() for name, tensor in zip(names, arrays)}, status=status_all.numpy(),
                      counts={"world_size": world, "batches_total": len(batches),
                              "batches_resumed": int(batch_counts[0]), "batches_computed": int(batch_counts[1])},
                      key=resume.key if resume else None)


def _loop(model: nn.Module, dataset: ImageDataset, step: Step, outputs: Mapping[str, ItemOutput],
          batches: List[List[int]], state: RunState, resume: Optional[_Resume], strict: bool, workers: int,
          save_every_s: float, bar: Any) -> Tuple[RunState, Optional[Exception]]:
    """Run ``step`` over ``batches`` from ``state``; returns the final state and, under torchrun, this rank's
    error (raised at once when not distributed). Each batch is committed by one assignment of a new state, so
    the state saved on any interrupt holds whole batches only."""
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skipping, num_workers=workers)
    last_save = time.monotonic()
    try:
        with analysis_mode(model):
            for batch in loader:
                if batch.skipped and strict:
                    raise HpxError(f"unreadable image {dataset.name(batch.skipped[0])} "
                                   "(drop --strict to skip such files)")
                indices = batch.indices.numpy()
                produced = step(batch) if len(indices) else {}
                state = state.committed(outputs, indices, batch.skipped, produced)
                bar.update(1)
                if resume and time.monotonic() - last_save >= save_every_s:
                    resume.save(state)
                    last_save = time.monotonic()
    except BaseException as err:  # save what is done; other ranks must hear of it, or they wait forever
        if resume:
            resume.save(state)
        if rank_and_world()[1] == 1 or not isinstance(err, Exception):
            raise
        return state, err
    finally:
        bar.close()
    if resume:
        resume.save(state)
    return state, None


__all__ = ["ImageDataset", "Batch", "collate_skipping", "ItemOutput", "SumOutput", "RunOutputs", "RunState",
           "RunStore", "DigestCache", "SAVE_EVERY_S", "tensor_digest", "array_digest", "weights_digest",
           "kernel_edits_digest", "environment", "content_key", "run_key", "announce",
           "analysis_mode", "run_batches"]
