"""Labelled image sets for accuracy measurements: an ImageFolder tree or a flat folder + labels file.

``labelled_images(root, labels)`` lists (path, class index) pairs in a fixed order;
``stratified_subset`` picks a seeded subset spread evenly over classes; ``LabelledImageDataset``
reads and transforms them, giving no image for unreadable or corrupt files, which
``collate_skipping`` drops from the batch and reports.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import HpxError
from .images import IMAGE_SUFFIXES, ImageSource, list_images, read_rgb, round_robin_sample


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation sample: image file, class index and its name relative to the data root."""

    path: Path
    label: int
    name: str


def _image_folder(root: Path) -> List[LabelledImage]:
    """ImageFolder layout: one sub-folder per class; sorted folder names map to indices 0, 1, ..."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = []
    for index, cls in enumerate(classes):
        for path in list_images(root / cls):
            samples.append(LabelledImage(path, index, str(path.relative_to(root))))
    return samples


def _parse_labels(labels_file: Path) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(filename, label) rows of a CSV / whitespace list, or bare labels (one per line, in file order)."""
    named: List[Tuple[str, str]] = []
    bare: List[str] = []
    with open(labels_file, newline="") as handle:
        for row in csv.reader(handle):
            fields = [f.strip() for f in (row if len(row) > 1 else (row[0].split() if row else []))]
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) == 1:
                bare.append(fields[0])
            else:
                named.append((fields[0], fields[1]))
    if named and bare:
        raise HpxError(f"labels file {labels_file} mixes 'filename,label' rows and bare labels")
    if named and not named[0][1].lstrip("-").isdigit():
        named = named[1:]  # a header row such as "filename,label"
    return named, bare


def _flat_folder(root: Path, labels_file: Path) -> List[LabelledImage]:
    """Flat folder + labels: CSV/whitespace ``filename,label`` rows, or one label per line matched
    to the sorted image files (ImageNet's validation ground-truth list)."""
    if not labels_file.is_file():
        raise HpxError(f"labels file not found: {labels_file}")
    named, bare = _parse_labels(labels_file)
    images = list_images(root)
    if bare:
        if len(bare) != len(images):
            raise HpxError(f"labels file {labels_file} has {len(bare)} labels but {root} has {len(images)} images")
        named = [(str(p.relative_to(root)), label) for p, label in zip(images, bare)]
    if not named:
        raise HpxError(f"labels file {labels_file} holds no labels")
    if not all(label.lstrip("-").isdigit() for _, label in named):
        raise HpxError(f"labels in {labels_file} must be integer class indices")
    samples = []
    for name, label in sorted(named):
        path = root / name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise HpxError(f"labels file {labels_file} names '{name}', which is not an image file")
        samples.append(LabelledImage(path, int(label), name))
    return samples


def labelled_images(root: Path | str, labels_file: Optional[Path | str] = None) -> List[LabelledImage]:
    """Every labelled sample of ``root``, sorted by name.

    Without ``labels_file`` root must be an ImageFolder tree (class sub-folders); with it, a flat
    folder whose images the file labels. Files named by the labels file but missing on disk are
    kept: they are counted as unreadable when read.
    """
    root = Path(root)
    if not root.is_dir():
        raise HpxError(f"data folder not found: {root}")
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
        raise HpxError(f"--limit must be positive, got {count}")
    by_class: Dict[int, List[LabelledImage]] = {}
    for sample in sorted(samples, key=lambda s: s.name):
        by_class.setdefault(sample.label, []).append(sample)
    return sorted(round_robin_sample(by_class, count, seed), key=lambda s: s.name)


class LabelledImageDataset(Dataset):
    """Item i: (image (3, H, W) after ``transform``, or None when the file cannot be read; label; i)."""

    def __init__(self, samples: Sequence[LabelledImage], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Optional[Tensor], int, int]:
        sample = self.samples[index]
        image = read_rgb(ImageSource(name=sample.name, path=sample.path))
        return (None if image is None else self.transform(image)), sample.label, index


@dataclass
class Batch:
    """Readable images (B, 3, H, W), their labels (B,) and sample indices (B,); unreadable indices."""

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
