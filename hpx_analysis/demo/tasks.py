"""Synthetic 64 px proxy tasks, generated on the fly from a seed, with the answer known per image.

Every image shows two white square marks on a grey, slightly noisy background, their left edges at
least ``MIN_GAP`` pixels apart horizontally. Marks sit on the ``GRID``-pixel grid of the proxies' stride-4 tokens, so each
covers exactly 2 x 2 tokens. The grey is the models' normalisation mean, so background tokens start
near zero; on a noise-free image it is also what FGVis deletes towards, so all the information there is
lies in the marks:

- ``same-row`` (global): label 1 when both marks lie on the same row, 0 when their rows differ by at
  least ``ROW_GAP``. Each mark alone looks the same in both classes (every row is equally likely in
  both); only relating two regions over half an image apart answers it.
- ``stripes`` (local): both marks carry stripes, label 0 horizontal, 1 vertical. Any small window
  on a mark answers it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

IMAGE_SIZE = 64
MARK = 8          # side of a mark in pixels
GRID = 4          # marks' corners lie on multiples of GRID pixels (the proxies' token stride)
MIN_GAP = 40      # smallest horizontal distance between the two marks' left edges (32 px between marks)
ROW_GAP = 12      # smallest row difference of the marks in the "different rows" class
BACKGROUND = 0.5
NOISE_STD = 0.05  # background noise of training and evaluation images
MARK_VALUE = 1.0


@dataclass(frozen=True)
class ProxyTask:
    """A binary image task: name, what it needs (``global``/``local``) and its class names."""

    name: str
    scope: str
    classes: Tuple[str, str]
    description: str


TASKS: Dict[str, ProxyTask] = {
    "same-row": ProxyTask("same-row", "global", ("different_rows", "same_row"),
                          "two marks >= 40 px apart: same row (1) or rows differ (0)"),
    "stripes": ProxyTask("stripes", "local", ("horizontal", "vertical"),
                         "two striped marks: horizontal (0) or vertical (1) stripes"),
}


@dataclass
class TaskBatch:
    """images (N, 3, S, S) in [0, 1], labels (N,) int64, marks (N, S, S) bool: the pixels of the marks."""

    images: Tensor
    labels: Tensor
    marks: Tensor


def task_parameters(task: str) -> Dict[str, object]:
    """Everything :func:`sample_task` draws ``task`` from: the task's definition and the generator's constants
    (part of the cache keys of the demo's proxies and evaluation images)."""
    if task not in TASKS:
        raise ValueError(f"unknown proxy task '{task}'; known: {', '.join(TASKS)}")
    return {"task": asdict(TASKS[task]), "image_size": IMAGE_SIZE, "mark": MARK, "grid": GRID, "min_gap": MIN_GAP,
            "row_gap": ROW_GAP, "background": BACKGROUND, "noise_std": NOISE_STD, "mark_value": MARK_VALUE}


def _mark_positions(count: int, generator: torch.Generator, same_row: Tensor) -> Tuple[Tensor, Tensor]:
    """Top-left corners (N, 2) rows and (N, 2) columns of the two marks, multiples of ``GRID``; rows
    equal where ``same_row``."""
    span = (IMAGE_SIZE - MARK) // GRID + 1           # grid positions a mark can take per axis
    gap, row_gap = -(-MIN_GAP // GRID), -(-ROW_GAP // GRID)
    left = torch.randint(0, span - gap, (count,), generator=generator)
    right = left + gap + (torch.rand(count, generator=generator) * (span - gap - left)).long()
    swap = torch.rand(count, generator=generator) < 0.5
    columns = torch.stack([torch.where(swap, right, left), torch.where(swap, left, right)], dim=1)
    first = torch.randint(0, span, (count,), generator=generator)
    # a second row at least row_gap away: an offset in [row_gap, span - row_gap] taken modulo the span
    offset = row_gap + (torch.rand(count, generator=generator) * (span - 2 * row_gap + 1)).long()
    second = torch.where(same_row, first, (first + offset) % span)
    return GRID * torch.stack([first, second], dim=1), GRID * columns


def _boxes(rows: Tensor, columns: Tensor) -> Tensor:
    """(N, S, S) bool: the union of the marks with top-left corners rows[:, k], columns[:, k]."""
    grid = torch.arange(IMAGE_SIZE)
    inside = torch.zeros(len(rows), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for k in range(rows.shape[1]):
        in_rows = (grid[None] >= rows[:, k, None]) & (grid[None] < rows[:, k, None] + MARK)
        in_cols = (grid[None] >= columns[:, k, None]) & (grid[None] < columns[:, k, None] + MARK)
        inside |= in_rows[:, :, None] & in_cols[:, None, :]
    return inside


def sample_task(task: str, count: int, seed: int, noise_std: float = NOISE_STD) -> TaskBatch:
    """``count`` images of ``task`` (see :data:`TASKS`), the same for the same seed; balanced labels in
    random order. ``noise_std``: the background's Gaussian noise."""
    if task not in TASKS:
        raise ValueError(f"unknown proxy task '{task}'; known: {', '.join(TASKS)}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randperm(count, generator=generator) % 2
    same_row = labels.bool() if task == "same-row" else torch.rand(count, generator=generator) < 0.5
    rows, columns = _mark_positions(count, generator, same_row)
    marks = _boxes(rows, columns)
    images = BACKGROUND + noise_std * torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    value = torch.full((count, IMAGE_SIZE, IMAGE_SIZE), MARK_VALUE)
    if task == "stripes":
        grid = torch.arange(IMAGE_SIZE)
        horizontal = (grid[:, None] % 2 == 0).expand(IMAGE_SIZE, IMAGE_SIZE)
        stripes = torch.where(labels.bool()[:, None, None], horizontal.T, horizontal)
        value = torch.where(stripes, MARK_VALUE, BACKGROUND)
    images = torch.where(marks[:, None], value[:, None], images).clamp(0, 1)
    return TaskBatch(images=images, labels=labels, marks=marks)
