"""A long-filter family the library has never seen, defined here and nowhere else (issue 21): a separable row x
column long convolution, its mixer and a two-stage model. Kernels, coverage (window and energy), truncation and the
ERF run on it through the filter protocol (``LongFilterBase``) and give answers checked by hand."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hpx_analysis
from hpx_analysis.analyzers.coverage import compute_coverage
from hpx_analysis.analyzers.erf import effective_receptive_field
from hpx_analysis.analyzers.kernels import compute_kernels
from hpx_analysis.analyzers.truncation import truncation_sweep
from hpx_analysis.datasets import labelled_images
from hpx_analysis.images import eval_transform
from hpx_analysis.models.long_filters import SquareFilter

from .conftest import random_image_folder

SIZE = 9          # taps per side of every long kernel
INPUT = 32        # px; the stem has stride 4, so stage 1 works on 8 x 8 maps and stage 2 on 4 x 4
TAP = (-1, 2)     # the planted kernel's one tap: displacement (rows, columns) from the output pixel


class RowColumnFilter(SquareFilter):
    """A separable long kernel ``K[c, i, j] = column[c, i] * row[c, j]`` (C, S, S), windowless, two-sided."""

    kind = "row_column"

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        self.column = nn.Parameter(torch.randn(channels, size))
        self.row = nn.Parameter(torch.randn(channels, size))

    def base_kernel(self) -> Tensor:
        return self.column[:, :, None] * self.row[:, None, :]

    def forward(self, u: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), the true convolution with the kernel."""
        return self.convolve(u)


class RowColumnMixer(nn.Module):
    """The family's token mixer: its long filter alone."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.long_filter = RowColumnFilter(channels, SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.long_filter(x)


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.token_mixer = RowColumnMixer(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.token_mixer(x)


class Stage(nn.Module):
    def __init__(self, channels: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(Block(channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class TwoStageModel(nn.Module):
    """Stem (4 x 4 patches summed over RGB, no bias), two stages of one block each, mean pool, linear head."""

    def __init__(self, channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        self.num_classes = classes
        self.stem = nn.Conv2d(3, channels, 4, stride=4, bias=False)
        self.stages = nn.Sequential(Stage(channels, False), Stage(channels, True))
        self.head = nn.Linear(channels, classes)
        self.feature_info = [{"module": "stages.0", "num_chs": channels, "reduction": 4},
                             {"module": "stages.1", "num_chs": channels, "reduction": 8}]
        with torch.no_grad():
            self.stem.weight.fill_(1.0)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x.mean((-2, -1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.stages(self.stem(x)))


def _filters(model: TwoStageModel) -> List[RowColumnFilter]:
    return [stage.blocks[0].token_mixer.long_filter for stage in model.stages]


def _plant(model: TwoStageModel, tap=TAP) -> None:
    """Every long kernel: weight 1 at displacement ``tap`` from the centre, 0 elsewhere."""
    centre = SIZE // 2
    with torch.no_grad():
        for filt in _filters(model):
            filt.column.zero_()
            filt.row.zero_()
            filt.column[:, centre + tap[0]] = 1.0
            filt.row[:, centre + tap[1]] = 1.0


def test_the_library_has_never_heard_of_the_family() -> None:
    root = Path(hpx_analysis.__file__).parent
    assert not any("row_column" in path.read_text() or "RowColumn" in path.read_text() for path in root.rglob("*.py"))
    for path in (root / "analyzers").glob("*.py"):  # no analyzer switches on a mixer's kind
        source = path.read_text()
        assert not re.search(r"\.kind\s*(==|!=|in\b)|\b(ATTENTION|LOCAL_CONV|SEPARABLE_LONG_CONV|OTHER)\b", source), path.name


def test_kernels_show_the_planted_tap_as_a_true_convolution() -> None:
    model = TwoStageModel()
    _plant(model)
    kernels = compute_kernels(model, input_size=INPUT, normalisation="none")
    assert [layer["kind"] for layer in kernels.layers] == ["row_column"] * 2
    centre = SIZE // 2
    expected = np.zeros((1, SIZE, SIZE))
    expected[0, centre + TAP[0], centre + TAP[1]] = 1.0  # the kernel array: tap c + d at p + d
    np.testing.assert_array_equal(kernels.panels(0), expected)
    response = compute_kernels(model, input_size=INPUT, normalisation="none", orientation="response")
    np.testing.assert_array_equal(response.panels(1), expected[:, ::-1, ::-1])  # the input pixel p - d


def test_coverage_of_a_windowless_two_sided_kernel_and_its_energy_disc() -> None:
    model = TwoStageModel()
    _plant(model)
    coverage = compute_coverage(model, input_size=INPUT)
    assert [layer["kind"] for layer in coverage.layers] == ["row_column"] * 2
    np.testing.assert_allclose(coverage.arrays["feature_side"], [8, 4])
    np.testing.assert_allclose(coverage.arrays["mean"], [SIZE / 8, SIZE / 4])  # no window: every tap, S / F
    disc = 2 * math.hypot(*TAP) + 1  # all the weight sits sqrt(5) px from the centre: a disc of that radius
    np.testing.assert_allclose(coverage.arrays["energy_mean"], [disc / 8, disc / 4], rtol=1e-9)
    _plant(model, tap=(4, 4))  # a corner tap: the disc would reach past the kernel, so it is capped at S
    np.testing.assert_allclose(compute_coverage(model, input_size=INPUT).arrays["energy_mean"], [SIZE / 8, SIZE / 4])


def test_erf_of_stage_one_is_the_one_patch_the_planted_tap_reads() -> None:
    """The centre output p = (4, 4) of stage 1 is x[p - d] = the stem feature (5, 2): the input pixels of rows
    20-23 and columns 8-11, each through the stem's weight 1 in each of the three channels."""
    model = TwoStageModel()
    _plant(model)
    images = torch.rand(2, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(0))
    erf = effective_receptive_field(model, images, layer="stages.0", progress=False)
    expected = np.zeros((INPUT, INPUT))
    expected[20:24, 8:12] = 3.0
    np.testing.assert_allclose(erf.arrays["maps"][0], expected, atol=1e-6)  # the long filter runs as float32 FFTs


def _hand_logits(model: TwoStageModel, images: Tensor, size: float, stage: int) -> Tensor:
    """The model's logits with stage ``stage``'s kernel cut to the disc of relative size ``size``, computed here with
    F.conv2d and a mask built from tap coordinates (a true convolution is a cross-correlation with the flipped
    kernel)."""
    x = model.stem(images)
    for index, stage_module in enumerate(model.stages):
        x = stage_module.downsample(x)
        kernel = _filters(model)[index].base_kernel().detach()
        if index == stage:
            side = x.shape[-1]
            offsets = torch.arange(SIZE, dtype=torch.float64) - SIZE // 2
            distance = torch.sqrt(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (side / 2)
            kernel = kernel * (distance <= size + 1e-9).to(kernel.dtype)
        x = F.conv2d(x, kernel.flip(-2, -1)[:, None], padding=SIZE // 2, groups=kernel.shape[0])
    return model.forward_head(x)


def test_truncation_counts_what_a_hand_masked_convolution_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoStageModel(channels=2).eval()
    data = random_image_folder(tmp_path / "data", ("a", "b"), per_class=6, size=(INPUT, INPUT), seed=3)
    samples = labelled_images(data)
    sizes = [0.0, 0.5, 1.0, 3.0]
    sweep = truncation_sweep(model, samples, sizes=sizes, input_size=INPUT, batch_size=4, n_resamples=20,
                             progress=False)
    assert sweep.groups == ["S1", "S2"] and sweep.meta["layer_kinds"] == {"S1": ["row_column"], "S2": ["row_column"]}
    transform, _ = eval_transform(model, INPUT)
    from PIL import Image
    images = torch.stack([transform(Image.open(s.path).convert("RGB")) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        for stage in range(2):
            for j, size in enumerate(sizes):
                correct = int((_hand_logits(model, images, size, stage).argmax(1) == labels).sum())
                assert sweep.arrays["top1_correct"][1 + stage * len(sizes) + j] == correct, (stage, size)
    # kept taps counted by hand on the 9 x 9 grid: radius r * F / 2 taps at F = 8 (stage 1) and F = 4 (stage 2)
    def kept(radius: float) -> float:
        return sum(i * i + j * j <= radius * radius + 1e-9 for i in range(-4, 5) for j in range(-4, 5)) / 81
    np.testing.assert_allclose(sweep.arrays["kept_fraction"], [[kept(r * 4) for r in sizes], [kept(r * 2) for r in sizes]])
    np.testing.assert_allclose(sweep.arrays["coverage"], [SIZE / 8, SIZE / 4])  # windowless: S / F, on the r axis
    assert sweep.arrays["top1_correct"][1 + len(sizes) - 1] == sweep.arrays["top1_correct"][0]  # every tap kept
