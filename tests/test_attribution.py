"""The explanation-method registry (no import cycle among the analyzers, methods given by their step alone), the
skeleton's device and dtype, and known answers for occlusion, Grad-CAM and input x gradient.

Known-answer model (:class:`QuadrantModel`): a 4 x 4 stride-4 convolution makes an 8 x 8 feature map
of two channels, A0 = ReLU(mean of the cell - 1/2) (bright detector) and A1 = ReLU(-mean of the cell - 1/2)
(dark detector), and logit c = mean over the map of A_c (global average pooling, as in a classifier).
The images are a random dark background (normalised values in [-2, 0], so A0 = 0 on every background
cell) with one uniform bright colour (values in [1.2, 2], A0 = a >= 0.7, A1 = 0) on the top-left
quadrant, which is exactly the 4 x 4 feature cells (0..3, 0..3). Class 0's evidence therefore sits in
the quadrant:

* Occlusion (window w = H/8 = 4, stride w/2 = 2, black reference = -2): occluding background keeps
  A0 = 0 there and leaves every quadrant cell untouched, so class 0's score does not change; occluding
  any quadrant pixel lowers its cell's A0 strictly. A pixel's value is the mean drop of the windows
  covering it, so it is > 0 exactly where a covering window (starts 0, 2, ..., 28) meets the quadrant:
  rows and columns < 14 + 4 = 18, and 0 beyond. Pixel (0, 0) lies only in the window at (0, 0), which
  blackens cell (0, 0) entirely: its value is a / 64.
* Grad-CAM (on ``feature_info[-1]``: the ReLU output): d logit0 / d A = 1/64 everywhere, so the weights are
  (1/64, 0) and the cam is A0 / 64: a / 64 on the quadrant's cells, 0 elsewhere. Bilinear upsampling
  by 4 (half-pixel centres) reads at most half a cell past the quadrant (rows, columns < 18) and moves
  1/8 of the mass of the quadrant's last cell row (column) across its edge, so the quadrant keeps
  exactly (1 - 1/(8 * 4))^2 = (31/32)^2 of the map's mass; pixels < 14 read quadrant cells only: a / 64.
  For class 1 the dark detector, zero on the quadrant, is explained instead.
* Input x gradient (a method registered with its step alone): d logit0 / d x = 1 / (3 * 16 * 64) on every
  quadrant pixel (each in one active cell) and 0 on the background (A0 = 0 there), so the map
  ``|sum_c x * grad|`` is ``|sum_c x| / 3072`` on the quadrant and 0 elsewhere.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hpx_analysis.analyzers import methods
from hpx_analysis.analyzers.attribution import METHODS, attribute, explain
from hpx_analysis.analyzers.fgvis import FgvisSettings, fgvis
from hpx_analysis.analyzers.methods import (ExplanationBatch, ExplanationResult, StepExplainer, explanation_method,
                                            register_method, register_step, run_explanation)
from hpx_analysis.errors import HpxError

from .conftest import library_imports

PACKAGE = "hpx_analysis.analyzers."
SIZE, CELL, QUADRANT = 32, 4, 16
CELLS = QUADRANT // CELL  # feature cells per side of the quadrant
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EXPLANATION_MODULES = ("methods", "fgvis", "attribution", "sanity")


class QuadrantModel(nn.Module):
    """Logit c (N, 2) = spatial mean of channel c of ReLU(conv(x)): c = 0 bright, c = 1 dark cells (4 x 4)."""

    feature_info = [{"module": "features", "num_chs": 2, "reduction": CELL}]

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, CELL, stride=CELL)
        with torch.no_grad():
            conv.weight[0] = 1 / (3 * CELL * CELL)
            conv.weight[1] = -1 / (3 * CELL * CELL)
            conv.bias.fill_(-0.5)
        self.features = nn.Sequential(conv, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def quadrant_images(count: int) -> torch.Tensor:
    """Normalised images (count, 3, SIZE, SIZE): dark random background, one bright colour on the quadrant."""
    generator = torch.Generator().manual_seed(3)
    rgb = torch.rand(count, 3, SIZE, SIZE, generator=generator) * 0.5
    rgb[:, :, :QUADRANT, :QUADRANT] = 0.8 + 0.2 * torch.rand(count, 3, 1, 1, generator=generator)
    return (rgb - 0.5) / 0.25


def quadrant_activation(images: torch.Tensor) -> np.ndarray:
    """a (N,): A0 on every quadrant cell, by hand: mean of the quadrant's normalised colour - 1/2."""
    return (images[:, :, 0, 0].mean(1) - 0.5).numpy()


def window_reach(stop: int, window: int, stride: int) -> int:
    """End of the pixels that a sliding window (starts 0, stride, ... up to SIZE - window) covers
    together with some pixel before ``stop``."""
    return max(start for start in range(0, SIZE - window + 1, stride) if start < stop) + window


def test_occlusion_is_the_score_drop_of_windows_that_meet_the_quadrant() -> None:
    model, images = QuadrantModel().eval(), quadrant_images(2)
    result = attribute(model, images, "occlusion", target=0, mean=MEAN, std=STD)
    window, stride = result.meta["options"]["occlusion_window"], result.meta["options"]["occlusion_stride"]
    assert (window, stride) == (SIZE // 8, SIZE // 16)
    reach = window_reach(QUADRANT, window, stride)
    assert reach == 18
    maps = result.maps
    assert np.all(maps[:, reach:, :] == 0) and np.all(maps[:, :, reach:] == 0)
    assert np.all(result.arrays["attributions"][:, :, reach:, :] == 0)  # background occlusion changes nothing
    assert np.all(result.arrays["attributions"][:, :, :, reach:] == 0)
    assert np.all(maps[:, :reach, :reach] > 0)
    np.testing.assert_allclose(maps[:, 0, 0], quadrant_activation(images) / (SIZE // CELL) ** 2, rtol=1e-5)


def test_gradcam_keeps_the_mass_on_the_quadrant_up_to_the_upsampling_border() -> None:
    model, images = QuadrantModel().eval(), quadrant_images(2)
    result = attribute(model, images, "gradcam", target=0, mean=MEAN, std=STD)
    assert result.meta["options"]["layer"] == "features"
    maps = result.maps
    border = QUADRANT + CELL // 2  # bilinear upsampling reads half a cell past the last quadrant cell
    assert np.all(maps[:, border:, :] == 0) and np.all(maps[:, :, border:] == 0)
    inside = maps[:, :QUADRANT, :QUADRANT].sum((1, 2)) / maps.sum((1, 2))
    np.testing.assert_allclose(inside, (1 - 1 / (8 * CELLS)) ** 2, rtol=1e-5)
    inner = QUADRANT - CELL // 2  # pixels that read quadrant cells only
    expected = quadrant_activation(images) / (SIZE // CELL) ** 2
    np.testing.assert_allclose(maps[:, :inner, :inner], np.broadcast_to(expected[:, None, None], (2, inner, inner)),
                               rtol=1e-5)
    dark = attribute(model, images, "gradcam", target=1, mean=MEAN, std=STD).maps
    assert np.all(dark[:, :inner, :inner] == 0) and dark.sum() > 0  # class 1's channel is off on the quadrant


def test_per_image_targets_follow_their_images_across_engine_batches(tmp_path) -> None:
    """Targets [0, 1, 0] in batches of one image: each image's Grad-CAM is the one for its own class
    (class 1, the dark detector, is zero on the quadrant); a rerun with the same store reuses the run."""
    model, images = QuadrantModel().eval(), quadrant_images(3)
    per_image = attribute(model, images, "gradcam", target=[0, 1, 0], mean=MEAN, std=STD, batch_size=1,
                          resume_dir=tmp_path)
    bright = attribute(model, images, "gradcam", target=0, mean=MEAN, std=STD).maps
    dark = attribute(model, images, "gradcam", target=1, mean=MEAN, std=STD).maps
    np.testing.assert_array_equal(per_image.maps, np.stack([bright[0], dark[1], bright[2]]))
    assert per_image.meta["targets"] == [0, 1, 0] and per_image.arrays["attributions"].shape == (3, 1, SIZE, SIZE)
    assert per_image.meta["options"]["batches_computed"] == 3 and per_image.meta["options"]["world_size"] == 1
    again = attribute(model, images, "gradcam", target=[0, 1, 0], mean=MEAN, std=STD, batch_size=1,
                      resume_dir=tmp_path)
    assert (again.meta["options"]["batches_resumed"], again.meta["options"]["batches_computed"]) == (3, 0)
    np.testing.assert_array_equal(again.maps, per_image.maps)
    with pytest.raises(HpxError, match="one per image"):
        attribute(model, images, "gradcam", target=[0, 1], mean=MEAN, std=STD)


def test_explain_dispatches_through_the_registry() -> None:
    assert METHODS == ("fgvis", "saliency", "integrated-gradients", "occlusion", "gradcam")
    assert explanation_method("fgvis") is fgvis
    model, images = QuadrantModel().eval(), quadrant_images(1)
    via_explain = explain(model, images, "occlusion", target=0, mean=MEAN, std=STD)
    direct = attribute(model, images, "occlusion", target=0, mean=MEAN, std=STD)
    np.testing.assert_array_equal(via_explain.maps, direct.maps)
    with pytest.raises(HpxError, match="unknown explanation method 'lime'"):
        explain(model, images, "lime")
    with pytest.raises(ValueError, match="already registered"):
        register_method("saliency")(attribute)


def input_times_gradient(batch: ExplanationBatch) -> dict:
    """A toy method's step: ``|sum_c x * d score_target / dx|`` (B, H, W)."""
    x = batch.images.detach().requires_grad_()
    (grad,) = torch.autograd.grad(batch.model(x).gather(1, batch.targets[:, None]).sum(), x)
    return {"maps": (x * grad).sum(1).abs()}


def test_a_method_given_by_its_step_alone_runs_resumes_and_has_the_common_layout(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # the registration ends with the test
    assert register_step("input-x-gradient")(input_times_gradient) is input_times_gradient
    model, images = QuadrantModel().eval(), quadrant_images(3)
    options = dict(target=0, mean=MEAN, std=STD, batch_size=2, names=["a", "b", "c"], resume_dir=tmp_path)
    result = explain(model, images, "input-x-gradient", **options)
    expected = np.zeros((3, SIZE, SIZE), np.float32)
    gradient = 1 / (3 * CELL ** 2 * (SIZE // CELL) ** 2)  # d logit0 / dx on the quadrant (module docstring)
    expected[:, :QUADRANT, :QUADRANT] = (images[:, :, :QUADRANT, :QUADRANT].sum(1).abs() * gradient).numpy()
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=0)
    builtin = explain(model, images, "saliency", **options)
    assert type(result) is ExplanationResult and result.method == "input-x-gradient"
    assert set(result.arrays) == set(builtin.arrays) - {"attributions"} and set(result.meta) == set(builtin.meta)
    assert result.maps.shape == builtin.maps.shape and result.maps.dtype == builtin.maps.dtype
    np.testing.assert_array_equal(result.inputs, builtin.inputs)
    assert (result.meta["images"], result.meta["targets"]) == (["a", "b", "c"], [0, 0, 0])
    assert set(result.meta["options"]) == set(builtin.meta["options"]) - {"reference"}
    assert (result.meta["options"]["batches_total"], result.meta["options"]["batches_computed"]) == (2, 2)
    again = explain(model, images, "input-x-gradient", **options)
    assert (again.meta["options"]["batches_resumed"], again.meta["options"]["batches_computed"]) == (2, 0)
    assert again.meta["options"]["run_key"] == result.meta["options"]["run_key"] != builtin.meta["options"]["run_key"]
    np.testing.assert_array_equal(again.maps, result.maps)


def test_each_batch_runs_in_the_dtype_of_the_models_parameters() -> None:
    """float32 images, a float64 model: the step sees float64 batches on the model's device, and every method's
    maps (float32) match the float32 model's."""
    model, images = QuadrantModel().eval(), quadrant_images(2)
    double = QuadrantModel().double().eval()
    seen = []

    def probe(batch: ExplanationBatch) -> dict:
        seen.append((batch.images.dtype, batch.images.device, batch.probs.dtype))
        return {"maps": torch.zeros(len(batch.images), SIZE, SIZE)}

    run_explanation(double, images, StepExplainer("probe", probe), target=0, mean=MEAN, std=STD)
    assert seen == [(torch.float64, torch.device("cpu"), torch.float64)]
    for method in METHODS:
        options = dict(target=0, mean=MEAN, std=STD)
        if method == "fgvis":
            options["settings"] = FgvisSettings(iterations=5, lambda_tries=1, noise_std=0.0)
        in_double, in_float = explain(double, images, method, **options), explain(model, images, method, **options)
        assert in_double.maps.dtype == np.float32 and in_double.meta["targets"] == [0, 0]
        np.testing.assert_allclose(in_double.maps, in_float.maps, rtol=1e-4, atol=1e-6, err_msg=method)


def test_explanation_modules_share_pieces_without_a_cycle() -> None:
    """methods holds what fgvis and attribution share, so fgvis does not import attribution (which imports fgvis
    to register it); the whole library is checked for cycles in test_packaging."""
    graph = {name.rpartition(".")[2]: {m.rpartition(".")[2] for m in imported if m.startswith(PACKAGE)}
             for name, imported in library_imports().items() if name.startswith(PACKAGE)}
    assert graph["methods"] == set()
    assert "attribution" not in graph["fgvis"] and "methods" in graph["fgvis"]
    assert {"fgvis", "methods"} <= graph["attribution"]


FRESH_IMPORTS = """
import importlib, sys
names = sys.argv[1].split(",")
for first in names:  # each module first, the others after it in reverse order, from a clean slate
    for loaded in [m for m in sys.modules if m.startswith("hpx_analysis.analyzers")]:  # the package too
        del sys.modules[loaded]
    for name in [first] + [n for n in reversed(names) if n != first]:
        importlib.import_module(f"hpx_analysis.analyzers.{name}")
    print(",".join(sys.modules["hpx_analysis.analyzers.methods"].registered_methods()))
"""


def test_each_explanation_module_imports_first_in_a_fresh_interpreter() -> None:
    """In a fresh interpreter, each module imports first (the others after it, in reverse order) and the
    registry ends up complete and in the same order every time."""
    run = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, ",".join(EXPLANATION_MODULES)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [",".join(METHODS)] * len(EXPLANATION_MODULES)
