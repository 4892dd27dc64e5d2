"""Labelled image sets for accuracy measurements: an ImageFolder tree or a flat folder + labels file.

Labels are class indices or ImageNet-1k WordNet ids (``n01440764``), which map to timm's class
order (the sorted 1000 synsets, :class:`timm.data.ImageNetInfo`). Accepted labels files: CSV or
whitespace ``filename,label`` rows (filenames with or without their suffix, so Kaggle's
``LOC_val_solution.csv`` works), one label per line in sorted file order, and the ImageNet devkit's
``ILSVRC2012_validation_ground_truth.txt`` (devkit ids 1-1000, mapped through the devkit's
``meta.mat``; the labels option may also name the devkit folder or its ``.tar.gz``).

``labelled_images(root, labels)`` lists (path, class index) pairs in a fixed order;
``stratified_subset`` picks a seeded subset spread evenly over classes; the run layer
(:class:`hpx_analysis.engine.ImageDataset`) reads and transforms them, skipping unreadable files.
"""

from __future__ import annotations

import csv
import functools
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import HpxError
from .images import IMAGE_SUFFIXES, list_images, round_robin_sample


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation sample: image file, class index and its name relative to the data root."""

    path: Path
    label: int
    name: str


WNID = re.compile(r"^n\d{8}$")
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"


@functools.lru_cache(maxsize=1)
def imagenet_wnid_index() -> Dict[str, int]:
    """ImageNet-1k WordNet id -> timm class index (0-999)."""
    from timm.data import ImageNetInfo
    return {wnid: index for index, wnid in enumerate(ImageNetInfo().label_names())}


def _image_folder(root: Path) -> List[LabelledImage]:
    """ImageFolder layout, one sub-folder per class. Folders named by ImageNet-1k WordNet ids take
    timm's index of that id (right also for a subset of the classes); otherwise sorted folder
    names map to indices 0, 1, ..."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    wnids = imagenet_wnid_index()
    by_wnid = bool(classes) and all(cls in wnids for cls in classes)
    samples = []
    for position, cls in enumerate(classes):
        for path in list_images(root / cls):
            samples.append(LabelledImage(path, wnids[cls] if by_wnid else position, str(path.relative_to(root))))
    return samples


def _first_token(field: str) -> str:
    """The first whitespace-separated token of a label field (Kaggle's rows add boxes after the id)."""
    return field.split()[0] if field.split() else field


def _class_index(label: str, source: Path) -> int:
    """A label field as a class index: an integer, or an ImageNet-1k WordNet id (first token)."""
    token = _first_token(label)
    if token.lstrip("-").isdigit():
        return int(token)
    if WNID.match(token):
        index = imagenet_wnid_index().get(token)
        if index is None:
            raise HpxError(f"labels file {source} names WordNet id {token}, which is not an ImageNet-1k class")
        return index
    raise HpxError(f"labels in {source} must be class indices or ImageNet WordNet ids, got '{label}'")


def _is_label(field: str) -> bool:
    token = _first_token(field)
    return token.lstrip("-").isdigit() or bool(WNID.match(token))


def _parse_labels(text: str) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(filename, label) rows of a CSV / whitespace list, or bare labels (one per line, in file order)."""
    named: List[Tuple[str, str]] = []
    bare: List[str] = []
    for row in csv.reader(io.StringIO(text)):
        fields = [f.strip() for f in (row if len(row) > 1 else (row[0].split() if row else []))]
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 1:
            bare.append(fields[0])
        else:
            named.append((fields[0], fields[1]))
    if named and bare:
        raise HpxError("the labels file mixes 'filename,label' rows and bare labels")
    if named and not _is_label(named[0][1]):
        named = named[1:]  # a header row such as "filename,label" or "ImageId,PredictionString"
    return named, bare


def _read_devkit(labels: Path) -> Optional[Tuple[str, bytes]]:
    """(ground-truth text, meta.mat bytes) when ``labels`` is the devkit's ground-truth file, its
    folder (or ``data/`` folder) or its ``.tar.gz``; None for any other labels file."""
    if labels.is_dir():
        found = sorted(labels.rglob(DEVKIT_GROUND_TRUTH))
        if not found:
            raise HpxError(f"labels folder {labels} holds no {DEVKIT_GROUND_TRUTH} (ImageNet devkit)")
        labels = found[0]
    if labels.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(labels) as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            if DEVKIT_GROUND_TRUTH not in members or DEVKIT_META not in members:
                raise HpxError(f"{labels} is not the ImageNet devkit: it lacks {DEVKIT_GROUND_TRUTH} or {DEVKIT_META}")
            return (archive.extractfile(members[DEVKIT_GROUND_TRUTH]).read().decode(),
                    archive.extractfile(members[DEVKIT_META]).read())
    if labels.name != DEVKIT_GROUND_TRUTH:
        return None
    meta = labels.parent / DEVKIT_META
    if not meta.is_file():
        raise HpxError(f"{labels.name} holds devkit ids (1-1000), which need the devkit's {DEVKIT_META} next to it "
                       f"to become class indices; pass the devkit folder or its .tar.gz as --labels")
    return labels.read_text(), meta.read_bytes()


def _devkit_labels(ground_truth: str, meta: bytes, source: Path) -> List[str]:
    """The devkit's per-image ids (1-1000, in validation file order) as WordNet ids via ``meta.mat``.

    torchvision reads the same two files, but only inside ``parse_devkit_archive``, which accepts
    nothing but the official archive (MD5-checked) and writes its ``meta.bin`` beside it.
    """
    from scipy.io import loadmat
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError) as err:
        raise HpxError(f"cannot read the devkit's {DEVKIT_META} from {source}: {err}") from None
    try:
        return [id_to_wnid[int(line)] for line in ground_truth.split()]
    except (KeyError, ValueError) as err:
        raise HpxError(f"{source}: devkit id {err} is not a leaf synset of {DEVKIT_META}") from None


def _flat_folder(root: Path, labels_file: Path) -> List[LabelledImage]:
    """Flat folder + labels: ``filename,label`` rows, one label per line matched to the sorted image
    files, or the ImageNet devkit's ground truth (see the module docstring)."""
    if not labels_file.exists():
        raise HpxError(f"labels file not found: {labels_file}")
    devkit = _read_devkit(labels_file)
    if devkit is not None:
        named, bare = [], _devkit_labels(*devkit, labels_file)
    else:
        try:
            named, bare = _parse_labels(labels_file.read_text())
        except UnicodeDecodeError:
            raise HpxError(f"labels file {labels_file} is not text") from None
    images = list_images(root)
    if bare:
        if len(bare) != len(images):
            raise HpxError(f"labels file {labels_file} has {len(bare)} labels but {root} has {len(images)} images")
        named = [(str(p.relative_to(root)), label) for p, label in zip(images, bare)]
    if not named:
        raise HpxError(f"labels file {labels_file} holds no labels")
    by_stem = {str(p.relative_to(root).with_suffix("")): str(p.relative_to(root)) for p in images}
    samples = []
    for name, label in sorted(named):
        name = name if Path(name).suffix.lower() in IMAGE_SUFFIXES else by_stem.get(name, name)
        path = root / name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise HpxError(f"labels file {labels_file} names '{name}', which is not an image file in {root}")
        samples.append(LabelledImage(path, _class_index(label, labels_file), name))
    return sorted(samples, key=lambda s: s.name)


def labelled_images(root: Path | str, labels_file: Optional[Path | str] = None) -> List[LabelledImage]:
    """Every labelled sample of ``root``, sorted by name.

    Without ``labels_file`` root must be an ImageFolder tree (class sub-folders); with it, a flat
    folder whose images the file labels. Files named by the labels file but missing on disk are
    kept: they are counted as unreadable when read.
    """
    root = Path(root)
    if not root.is_dir():
        raise HpxError(f"{root} is a file; --data takes the folder of images" if root.is_file()
                       else f"data folder not found: {root}")
    samples = _flat_folder(root, Path(labels_file)) if labels_file is not None else _image_folder(root)
    if not samples:
        raise HpxError(f"no labelled images under {root}: expected class sub-folders of images "
                       f"(ImageFolder) or a flat folder with --labels")
    if any(s.label < 0 for s in samples):
        raise HpxError("class indices must be non-negative")
    return samples


def stratified_subset(samples: Sequence[LabelledImage], count: Optional[int], seed: int) -> List[LabelledImage]:
    """``count`` samples spread evenly over classes (round-robin over sorted labels, each class
    shuffled with ``seed``); all samples when count is None or too large. Sorted by name."""
    if count is None or count >= len(samples):
        return sorted(samples, key=lambda s: s.name)
    if count < 1:
        raise HpxError(f"the subset size must be positive, got {count}")
    by_class: Dict[int, List[LabelledImage]] = {}
    for sample in sorted(samples, key=lambda s: s.name):
        by_class.setdefault(sample.label, []).append(sample)
    return sorted(round_robin_sample(by_class, count, seed), key=lambda s: s.name)
