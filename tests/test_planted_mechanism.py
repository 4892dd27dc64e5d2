"""Known answers of the truncation and FGVis analyzers on a model whose mechanism is planted.

The demo checks these answers on a proxy whose long kernels are learned (``test_demo``); here the
answer is fixed by construction instead, so a failure points at the analyzers and not at training: a
one-stage HyenaPixel model (16 x 16 tokens, 5x5 short convs, so the short path sees at most 23 px, less
than the >= 32 px between the two marks) whose every long kernel is a horizontal line,
``K[c, 0, dx] = 1`` for dx != 0 and 0 elsewhere. Summed along a row, each mark sees the other one
exactly when they share a row: the long filter is the only path that relates them. The rest of the
model is trained on same-row (300 steps, about 20 s on 2 cores) and solves it; the analyzers must then
find that

- cutting the long kernels to their centre tap (r = 0) leaves chance, and keeping every tap changes
  nothing (the truncation sweep, as ``hpx-analyze truncate`` runs it, and ``truncate_kernels``);
- FGVis flips the decision by deleting the marks far more than the background.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from hpx_analysis.analyzers.fgvis import FgvisSettings, fgvis
from hpx_analysis.analyzers.scores import energy_pointing_game
from hpx_analysis.analyzers.truncation import truncation_sweep
from hpx_analysis.datasets import labelled_images
from hpx_analysis.demo.pipeline import GLOBAL_TASK, mark_boxes, write_task_folder
from hpx_analysis.demo.tasks import IMAGE_SIZE, sample_task
from hpx_analysis.demo.training import EVAL_SEED_OFFSET, TrainingConfig, fit_on_task, task_accuracy
from hpx_analysis.images import model_mean_std, normalise
from hpx_analysis.interventions import modify_kernels, truncate_kernels
from hpx_analysis.models.hyenapixel import HyenaPixelFormer

pytestmark = pytest.mark.slow

TRAINING = TrainingConfig(model="planted_line", task=GLOBAL_TASK, steps=300, lr=1e-3)


def _row_kernel(kernel: torch.Tensor, _info) -> torch.Tensor:
    """(C, S, S) -> the planted kernel: ones along the centre row, zero at the centre tap and elsewhere."""
    line = torch.zeros_like(kernel)
    centre = kernel.shape[-1] // 2
    line[:, centre, :] = 1.0
    line[:, centre, centre] = 0.0
    return line


@pytest.fixture(scope="module")
def planted():
    """The trained planted-line model, its long kernels held at the line while the tests run."""
    torch.manual_seed(0)
    model = HyenaPixelFormer([{"type": "hpx", "long_kernel_size": 31, "filter_emb_dim": 16}],
                             depths=(1,), dims=(32,), num_classes=2)
    model.pretrained_cfg = timm.models.get_pretrained_cfg("proxy_hpx_former").to_dict()  # 64 px, mean/std 0.5
    with modify_kernels(model, _row_kernel):
        fit_on_task(model, TRAINING, progress=False)
        model.requires_grad_(False)
        yield model


def test_planted_model_solves_the_global_task(planted):
    assert task_accuracy(planted, GLOBAL_TASK, 512, 0) >= 0.95


def test_truncation_to_the_centre_tap_leaves_chance(planted):
    inputs = normalise(sample_task(GLOBAL_TASK, 512, EVAL_SEED_OFFSET).images, *model_mean_std(planted))
    untruncated = planted(inputs)
    with truncate_kernels(planted, stages=[0], size=0.0, input_size=IMAGE_SIZE):
        assert abs(task_accuracy(planted, GLOBAL_TASK, 512, 0) - 0.5) <= 0.1
    with truncate_kernels(planted, stages=[0], size=3.0, input_size=IMAGE_SIZE):  # every tap (corners: 2.65)
        torch.testing.assert_close(planted(inputs), untruncated)
    torch.testing.assert_close(planted(inputs), untruncated)  # the planted kernel is back


def test_truncation_sweep_finds_the_planted_dependence(planted, tmp_path: Path):
    """The sweep that ``hpx-analyze truncate`` runs, over an ImageFolder of held-out PNGs."""
    data = write_task_folder(GLOBAL_TASK, 256, 0, tmp_path)
    sweep = truncation_sweep(planted, labelled_images(data), None, [0.0, 2.0], input_size=IMAGE_SIZE,
                             batch_size=64, n_resamples=50, progress=False)
    at_centre, at_full = sweep.arrays["top1"][0]
    assert at_full >= 0.95 and abs(at_centre - 0.5) <= 0.1


def test_fgvis_deletes_the_marks(planted):
    """With the background as the deletion reference ("mean": grey after normalisation), the masks that
    flip same-row delete mark pixels at least 4x as much as background pixels, in every image."""
    batch = sample_task(GLOBAL_TASK, 64, 5)
    chosen = torch.nonzero(batch.labels == 1).flatten()[:4]
    result = fgvis(planted, normalise(batch.images[chosen], *model_mean_std(planted)), seed=0,
                   settings=FgvisSettings(reference="mean"))
    assert all(record["success"] for record in result.records)
    maps, marks = result.arrays["maps"], batch.marks[chosen].numpy()
    on_marks = energy_pointing_game(maps, mark_boxes(batch.marks[chosen]))  # share of the mass on the marks
    mark_share = marks.reshape(len(marks), -1).mean(axis=1)
    enrichment = (on_marks / mark_share) / ((1 - on_marks) / (1 - mark_share))
    assert (enrichment >= 4).all(), enrichment
