"""ERF analyzer: known answers on linear toy models, metrics on constructed maps (kim2023: OpenERF's
definitions), preprocessing per convention, resume, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize_scalar
from scipy.signal import convolve2d
from timm.models.metaformer import StarReLU
from torch import nn
from typer.testing import CliRunner

import hpx_analysis.models.frozen as frozen
from hpx_analysis.analyzers.erf import (OPENERF_RADII, ROW_OPTIONS, ERFResult, area_ratios, display_map,
                                        effective_receptive_field, erf_gradient_maps, erf_gradient_maps_by_layer,
                                        gaussian_fit, mass_within, radial_mass, radial_mass_summary,
                                        resolve_output_layer)
from hpx_analysis.engine import analysis_mode
from hpx_analysis.errors import HpxError
from hpx_analysis.images import read_rgb, sample_images
from hpx_analysis.inspection import LayerRef, kernel
from hpx_analysis.models.long_filters import HyenaPixelFilter
from hpx_analysis.models.zoo import load_model
from hpx_analysis_cli.app import app

from .conftest import one_process, torchrun


def _box_stack(layers: int, size: int) -> nn.Sequential:
    """Linear model: RGB sum followed by ``layers`` all-ones size x size convolutions (zero padding)."""
    convs = [nn.Conv2d(3 if i == 0 else 1, 1, size, padding=size // 2, bias=False) for i in range(layers)]
    for conv in convs:
        nn.init.ones_(conv.weight)
    return nn.Sequential(*convs).eval()


def _placed(footprint: np.ndarray, shape: tuple) -> np.ndarray:
    """footprint (odd sides) centred on pixel (H//2, W//2) of a zero map of ``shape``."""
    out = np.zeros(shape)
    fh, fw = footprint.shape
    top, left = shape[0] // 2 - fh // 2, shape[1] // 2 - fw // 2
    out[top:top + fh, left:left + fw] = footprint
    return out


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def test_box_stack_erf_is_n_fold_box_convolution() -> None:
    layers, size = 3, 5
    inputs = torch.rand(2, 3, 33, 33) + 0.1
    result = effective_receptive_field(_box_stack(layers, size), inputs, layer="", progress=False)
    footprint = np.ones((size, size))
    for _ in range(layers - 1):
        footprint = convolve2d(footprint, np.ones((size, size)))
    expected = 3 * _placed(footprint, (33, 33))  # one copy per input channel
    np.testing.assert_allclose(result.arrays["maps"][0], expected, rtol=1e-5)
    assert result.arrays["used"][0] == 2 and result.arrays["skipped"][0] == 0


def test_hyenapixel_filter_erf_is_flipped_kernel_footprint() -> None:
    torch.manual_seed(0)
    taps = 9
    long_filter = HyenaPixelFilter(channels=1, kernel_size=taps, emb_dim=4)
    custom = torch.rand(1, taps, taps) ** 2
    custom[0, 1, 6] = 3.0  # an off-centre peak: distinguishes convolution from cross-correlation
    long_filter.kernel_modifier = lambda _learned: custom
    with torch.no_grad():
        long_filter.bias.zero_()  # no skip path: the filter is the only connection
    rgb_sum = nn.Conv2d(3, 1, 1, bias=False)
    nn.init.ones_(rgb_sum.weight)
    model = nn.Sequential(rgb_sum, long_filter).eval()
    inputs = torch.rand(2, 3, 21, 21) + 0.1

    result = effective_receptive_field(model, inputs, layer="", progress=False)
    applied = kernel(long_filter)[0].numpy()
    np.testing.assert_allclose(applied, custom[0].numpy())
    erf = result.arrays["maps"][0]
    np.testing.assert_allclose(erf, 3 * _placed(applied[::-1, ::-1], (21, 21)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(erf, 3 * _placed(applied, (21, 21)), atol=1e-2)
    assert np.unravel_index(erf.argmax(), erf.shape) == (10 + 4 - 1, 10 + 4 - 6)


def test_kim_convention_recovers_gaussian_sigma() -> None:
    sigma_x, sigma_y, half = 3.0, 5.0, 20
    offsets = np.arange(-half, half + 1)
    gaussian = np.exp(-0.5 * ((offsets[None, :] / sigma_x) ** 2 + (offsets[:, None] / sigma_y) ** 2))
    conv = nn.Conv2d(3, 1, 2 * half + 1, padding=half, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(gaussian).float().expand(1, 3, -1, -1))
    inputs = torch.randn(3, 3, 61, 61)  # signs do not matter: the Kim scalar has no relu

    result = effective_receptive_field(conv.eval(), inputs, layer="", convention="kim2023", progress=False)
    erf = result.arrays["maps"][0]
    assert erf.sum() == pytest.approx(1.0)
    fit = result.meta["models"][0]["gaussian"]
    assert fit["sigma_x"] == pytest.approx(sigma_x, rel=1e-3)
    assert fit["sigma_y"] == pytest.approx(sigma_y, rel=1e-3)
    assert fit["r2"] > 0.999
    assert (fit["x0"], fit["y0"]) == (pytest.approx(30, abs=1e-3), pytest.approx(30, abs=1e-3))
    mass = result.arrays["radial_mass"][0]
    assert np.all(np.diff(mass) >= -1e-12) and mass[-1] == pytest.approx(1.0)


def test_radial_mass_of_isotropic_gaussian_matches_rayleigh() -> None:
    sigma = 6.0
    yy, xx = np.indices((121, 121)) - 60
    mass = radial_mass(np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2)))
    for radius in (6, 12, 18):
        assert mass[radius] == pytest.approx(1 - np.exp(-radius ** 2 / (2 * sigma ** 2)), abs=0.03)


def _unit_gaussian(xx: np.ndarray, yy: np.ndarray, amp: float, xc: float, yc: float, sx: float,
                   sy: float) -> np.ndarray:
    """OpenERF's fit model (openerf/fit.py): amp times the unit-volume axis-aligned 2D Gaussian."""
    return amp * np.exp(-(xx - xc) ** 2 / (2 * sx ** 2) - (yy - yc) ** 2 / (2 * sy ** 2)) / (2 * np.pi * sx * sy)


def test_gaussian_fit_follows_openerf_on_noisy_anisotropic_gaussian() -> None:
    height, width = 41, 53  # non-square: sigma_x / W and sigma_y / H must not swap
    yy, xx = np.indices((height, width), dtype=np.float64)
    floor = np.random.default_rng(0).uniform(0, 0.15, (height, width))  # relu'd noise: positive floor
    erf = np.exp(-0.5 * (((xx - 27.3) / 4.0) ** 2 + ((yy - 18.6) / 7.5) ** 2)) + floor
    data = erf / erf.sum()  # OpenERF fits the map normalised to sum 1

    # expected: the least-squares optimum of OpenERF's model (interior here, so unbounded
    # Levenberg-Marquardt from the true parameters finds it) and OpenERF's R^2 = 1 - var(res) / var(map)
    optimum = least_squares(lambda p: (_unit_gaussian(xx, yy, *p) - data).ravel(), x0=[1.0, 27.3, 18.6, 4.0, 7.5],
                            method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    residual = data - _unit_gaussian(xx, yy, *optimum)
    expected_r2 = 1 - residual.var() / data.var()
    sum_of_squares_r2 = 1 - (residual ** 2).sum() / ((data - data.mean()) ** 2).sum()
    assert expected_r2 - sum_of_squares_r2 > 0.03  # the residual's mean (the floor) separates the two

    fit = gaussian_fit(erf)
    assert fit["r2"] == pytest.approx(expected_r2, abs=1e-7)  # R^2 moves ~1e-8 within the optimum's flat valley
    for key, value in zip(("sigma_x", "sigma_y", "x0", "y0", "amplitude"), optimum[[3, 4, 1, 2, 0]]):
        assert fit[key] == pytest.approx(value, rel=1e-6), key
    assert fit["sigma_x_rel"] == pytest.approx(optimum[3] / width, rel=1e-6)
    assert fit["sigma_y_rel"] == pytest.approx(optimum[4] / height, rel=1e-6)


def test_gaussian_fit_keeps_the_centre_inside_openerf_bounds() -> None:
    yy, xx = np.indices((40, 40), dtype=np.float64)
    erf = np.exp(-0.5 * (((xx + 6) / 5.0) ** 2 + ((yy - 20) / 5.0) ** 2))  # true centre 6 px left of the image
    fit = gaussian_fit(erf)
    assert fit["x0"] == pytest.approx(0.0, abs=1e-6)  # bound 0 <= xc; an unbounded fit recovers -6
    # separable map and model: the y profile is fitted exactly; the x profile is the best centred
    # half-Gaussian c * exp(-x^2 / (2 s^2)) for exp(-(x + 6)^2 / 50), c solved in closed form
    profile, x = np.exp(-0.5 * ((np.arange(40) + 6) / 5.0) ** 2), np.arange(40.0)

    def misfit(s: float) -> float:
        shape = np.exp(-x ** 2 / (2 * s ** 2))
        return ((profile - shape * (shape @ profile) / (shape @ shape)) ** 2).sum()

    best = minimize_scalar(misfit, bounds=(0.5, 20), method="bounded", options={"xatol": 1e-10}).x
    assert fit["sigma_x"] == pytest.approx(best, rel=1e-5)
    assert (fit["y0"], fit["sigma_y"]) == (pytest.approx(20.0, abs=1e-6), pytest.approx(5.0, rel=1e-6))


def test_radial_mass_counts_pixels_at_distance_at_most_r() -> None:
    erf = np.zeros((31, 31))
    erf[15 + 3, 15 + 4] = 1.0  # distance 5 from the centre pixel (15, 15)
    erf[15 - 6, 15 + 8] = 3.0  # distance 10
    np.testing.assert_allclose(mass_within(erf, [4.99, 5, 9.99, 10]), [0, 0.25, 0.25, 1])
    np.testing.assert_allclose(radial_mass(erf)[[4, 5, 9, 10]], [0, 0.25, 0.25, 1])
    summary = radial_mass_summary(erf)
    assert list(summary["px"]) == [str(r) for r in OPENERF_RADII] and summary["px"]["5"] == 0.25
    assert summary["relative"]["0.25"] == 0.25  # 0.25 * 31 = 7.75 px
    assert summary["relative"]["0.5"] == 1.0  # 15.5 px


class _CentreTokens(nn.Module):
    """4x4 patches -> (B, 1 + N, C) tokens behind a class token (a minimal ViT front end)."""

    def __init__(self, with_attribute: bool) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 2, 4, stride=4, bias=False)
        nn.init.ones_(self.patches.weight)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 2))
        if with_attribute:
            self.num_prefix_tokens = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)


@pytest.mark.parametrize(("side", "first"), [(16, 4), (20, 8)])  # 4x4 grid: token (1, 1); 5x5: (2, 2)
@pytest.mark.parametrize("with_attribute", [True, False])
def test_kim_token_centre_is_upper_left_of_the_central_patches(side: int, first: int, with_attribute: bool) -> None:
    model = _CentreTokens(with_attribute).eval()
    result = effective_receptive_field(model, torch.randn(1, 3, side, side), layer="", convention="kim2023",
                                       progress=False)
    expected = np.zeros((side, side))
    expected[first:first + 4, first:first + 4] = 1 / 16
    np.testing.assert_allclose(result.arrays["maps"][0], expected, atol=1e-12)


_CHANNELS_LAST = {  # timm model: (options for 64 px inputs, stem, stage list, an inner layer); output NHWC
    "swin_tiny_patch4_window7_224": ({"img_size": 64}, "patch_embed", "layers", "layers.1.blocks.0"),
    "mambaout_femto": ({}, "stem", "stages", "stages.1.blocks.0.conv"),
}


@pytest.fixture(scope="module", params=sorted(_CHANNELS_LAST))
def channels_last_model(request) -> tuple:
    import timm

    torch.manual_seed(0)
    options, *paths = _CHANNELS_LAST[request.param]
    return (timm.create_model(request.param, pretrained=False, **options).eval(), *paths)


@pytest.mark.parametrize("convention", ["replknet", "kim2023"])
def test_channels_last_stage_erf_is_the_spatial_centres_gradient(channels_last_model: tuple, convention: str) -> None:
    """Swin and MambaOut stages emit (B, H, W, C) (timm's output_fmt NHWC): the ERF is the input
    gradient of the feature at the spatial centre (H//2, W//2), all channels, of stage 2's output
    (8 x 8 at 64 px)."""
    model, stem, stages, _inner = channels_last_model
    assert model.output_fmt == "NHWC"
    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = inputs.clone().requires_grad_(True)
    stage_two = model.get_submodule(stages)[:2](model.get_submodule(stem)(x))
    assert stage_two.shape[1:3] == (8, 8) and stage_two.shape[3] > 8  # (B, H, W, C)
    centre = stage_two[:, 4, 4, :]
    scalar = torch.relu(centre).sum() if convention == "replknet" else centre.mean(dim=1).sum()
    (grad,) = torch.autograd.grad(scalar, x)
    expected = torch.relu(grad).sum(dim=1) if convention == "replknet" else torch.relu(grad.mean(dim=1))

    maps = erf_gradient_maps(model, inputs, f"{stages}.1", convention)
    assert expected.abs().max() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_unknown_layouts_are_refused(channels_last_model: tuple) -> None:
    """Inside a channels-last model only the stage outputs have a reported layout (MambaOut's block
    convolution is channels-first, Swin's blocks channels-last); logits are no feature map."""
    model, _stem, _stages, inner = channels_last_model
    inputs = torch.randn(1, 3, 64, 64)
    with pytest.raises(HpxError, match=f"cannot tell the layout of layer '{inner}'"):
        erf_gradient_maps(model, inputs, inner, "replknet")
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    with pytest.raises(HpxError, match=r"gives a \(1, 5\) output"):
        erf_gradient_maps(linear, torch.randn(1, 3, 8, 8), "", "kim2023")


def test_kim_inputs_are_the_models_eval_transform(tiny_config, tiny_weights) -> None:
    from timm.data import create_transform, resolve_model_data_config

    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 48, 48), "crop_pct": 0.875}
    chelsea = [s for s in sample_images() if s.name == "chelsea"]  # 300 x 451: the crop matters
    image = read_rgb(chelsea[0])
    for size, side in ((None, 48), (40, 40)):
        result = effective_receptive_field(model, chelsea, input_size=size, convention="kim2023", progress=False)
        assert result.arrays["maps"].shape == (1, side, side)
        options = result.meta["options"]
        assert options["input_size"] == [side, side] and options["size_override"] == size
        assert "CenterCrop" in options["transform"]
        config = {**resolve_model_data_config(model), **({"input_size": (3, size, size)} if size else {})}
        prepared = create_transform(**config, is_training=False)(image)[None]  # OpenERF's preprocessing
        reference = effective_receptive_field(model, prepared, convention="kim2023", progress=False)
        np.testing.assert_allclose(result.arrays["maps"], reference.arrays["maps"], rtol=1e-6, atol=1e-12)


def test_replknet_default_stays_1024_px_without_crop() -> None:
    conv = nn.Conv2d(3, 1, 3, padding=1, bias=False).eval()
    nn.init.ones_(conv.weight)
    chelsea = [s for s in sample_images() if s.name == "chelsea"]
    result = effective_receptive_field(conv, chelsea, layer="", progress=False)
    assert result.arrays["maps"].shape == (1, 1024, 1024) and result.meta["options"]["size_override"] is None
    assert "no crop" in result.meta["options"]["transform"]
    np.testing.assert_allclose(result.arrays["maps"][0], 3 * _placed(np.ones((3, 3)), (1024, 1024)))
    with pytest.raises(HpxError):
        effective_receptive_field(conv, chelsea, input_size=0, layer="", progress=False)


def _reference_ratio(side: int, shape: tuple) -> float:
    """RepLKNet's reported area ratio of a square of ``side`` on a map of ``shape`` (s / H * s / W)."""
    return side / shape[0] * side / shape[1]


def test_area_ratios_of_uniform_maps() -> None:
    ratios = area_ratios(np.ones((65, 65)))
    # smallest odd side s >= 3 with s^2 > t * 65^2, up to 63 = 2 * (65 // 2 - 1) + 1
    for t, side in ((0.2, 31), (0.3, 37), (0.5, 47)):
        assert ratios[f"{t:g}"] == _reference_ratio(side, (65, 65))
    assert ratios["0.99"] is None  # 63^2 / 65^2 = 93.9%: the full image is never tried
    even = area_ratios(np.ones((64, 64)))
    assert even["0.99"] is None  # the largest centred square (63 px) holds only 96.9%
    assert even["0.5"] == _reference_ratio(47, (64, 64))
    assert all(value is None for value in area_ratios(np.zeros((9, 9))).values())


@pytest.mark.parametrize("shape", [(9, 9), (8, 8), (4, 4), (8, 11), (3, 3)])
def test_area_ratios_start_at_the_3x3_square(shape: tuple) -> None:
    """RepLKNet's loop starts at i = 1: mass in the centre pixel (H//2, W//2) alone gives the 3x3
    square, not 1 px, at every threshold; maps under 4 rows have no square at all."""
    display = np.zeros(shape)
    display[shape[0] // 2, shape[1] // 2] = 1.0
    expected = _reference_ratio(3, shape) if shape[0] >= 4 else None
    assert area_ratios(display) == dict.fromkeys(("0.2", "0.3", "0.5", "0.99"), expected)


def test_area_ratios_never_take_the_full_image() -> None:
    """Squares go up to side 2 * (H//2 - 1) + 1: H - 2 on odd sides (the outer ring is never inside),
    H - 1 on even sides (row 0 and column 0 are never inside)."""
    odd = np.ones((9, 9))
    odd[1:8, 1:8] = 0.0  # all mass on the outer ring
    assert set(area_ratios(odd).values()) == {None}
    uniform = area_ratios(np.ones((9, 9)))  # side 7 holds 49/81 = 60.5%
    assert (uniform["0.5"], uniform["0.99"]) == (_reference_ratio(7, (9, 9)), None)
    even = np.zeros((8, 8))
    even[7, 7] = 1.0  # bottom right: inside the 7 px square (rows and columns 1-7)
    assert area_ratios(even)["0.99"] == _reference_ratio(7, (8, 8))
    even[0, 4] = 1.0  # row 0: in no square, so no square ever holds more than half
    assert area_ratios(even) == {"0.2": _reference_ratio(7, (8, 8)), "0.3": _reference_ratio(7, (8, 8)),
                                 "0.5": None, "0.99": None}


def test_area_ratio_share_is_a_quotient_and_must_exceed_t() -> None:
    """The reference compares sum(square) / sum(map) > t: 3.45 of 11.5 is 0.3 exactly, not more,
    although 3.45 > 0.3 * 11.5 (= 3.4499999999999997 in floating point)."""
    display = np.zeros((7, 7))
    display[3, 3], display[0, 0] = 3.45, 8.05  # the corner is in no square: every square holds 3.45
    assert 3.45 > 0.3 * 11.5 and not 3.45 / 11.5 > 0.3
    assert area_ratios(display) == {"0.2": _reference_ratio(3, (7, 7)), "0.3": None, "0.5": None, "0.99": None}


def test_area_ratios_of_non_square_maps() -> None:
    """The loop runs over i <= H//2 - 1 on every map: a wide map keeps squares of at most H - 2 (odd H)
    and reports s / H * s / W; on a tall one the squares stop where they would leave the image."""
    wide = area_ratios(np.ones((7, 15)))  # squares 3 and 5 (25/105 = 23.8%), not 7 although it fits
    assert wide == {"0.2": _reference_ratio(5, (7, 15)), "0.3": None, "0.5": None, "0.99": None}
    tall = area_ratios(np.ones((15, 7)))  # squares 3, 5 and 7 (49/105 = 46.7%), then none inside
    assert tall == {"0.2": _reference_ratio(5, (15, 7)), "0.3": _reference_ratio(7, (15, 7)), "0.5": None,
                    "0.99": None}


def test_display_map_is_normalised_log() -> None:
    erf = np.array([[0.0, 9.0], [99.0, 999.0]])
    np.testing.assert_allclose(display_map(erf), [[0.0, 1 / 3], [2 / 3, 1.0]])


def test_nonfinite_images_are_skipped_and_counted() -> None:
    conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
    model = nn.Sequential(conv, _Square()).eval()
    inputs = torch.rand(3, 3, 15, 15)
    poisoned = inputs.clone()
    poisoned[1, :, 7, 7] = float("nan")
    result = effective_receptive_field(model, poisoned, layer="", batch_size=2, progress=False)
    clean = effective_receptive_field(model, inputs[[0, 2]], layer="", progress=False)
    assert result.arrays["used"][0] == 2 and result.arrays["skipped"][0] == 1
    np.testing.assert_allclose(result.arrays["maps"][0], clean.arrays["maps"][0], rtol=1e-5)


def test_batches_and_tiny_hyenapixel_match_single_images(tiny_config, tiny_weights) -> None:
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    inputs = torch.randn(3, 3, 64, 64)
    single = effective_receptive_field(model, inputs, batch_size=1, progress=False)
    batched = effective_receptive_field(model, inputs, batch_size=3, progress=False)
    scale = single.arrays["maps"].max()
    np.testing.assert_allclose(batched.arrays["maps"], single.arrays["maps"], rtol=1e-4, atol=1e-5 * scale)
    assert single.meta["models"][0]["layer"] == "stages.3"
    assert all(p.requires_grad for p in model.parameters())  # restored after the run


def test_fused_frozen_modules_give_timms_gradients(tiny_config, tiny_weights, monkeypatch) -> None:
    """Frozen StarReLUs and HyenaPixel gatings run fused (one StarReLU per block here, the one whose inner ReLU is read
    unfused; the gating of all four blocks) and the maps equal those of the modules' own graph (parameters requiring
    gradients), with StarReLU scales and biases away from 1 and 0."""
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for act in (m for m in model.modules() if isinstance(m, StarReLU)):
            act.scale.copy_(0.5 + torch.rand(1, generator=generator))
            act.bias.copy_(0.3 * torch.randn(1, generator=generator))
    inputs = torch.randn(2, 3, 64, 64, generator=generator)
    layers = ["stages.1.blocks.0.mlp.act.relu", "stages.3"]
    timm_maps = erf_gradient_maps_by_layer(model, inputs, layers)
    calls = {"star": 0, "gating": 0}
    for name, function in (("star", frozen.FrozenStarReLU), ("gating", frozen.FrozenHyenaPixelGating)):
        monkeypatch.setattr(function, "apply", lambda *args, name=name, apply=function.apply:
                            calls.__setitem__(name, calls[name] + 1) or apply(*args))
    with analysis_mode(model):
        fused = erf_gradient_maps_by_layer(model, inputs, layers)
    assert calls == {"star": 3, "gating": 4}  # StarReLU: stages.0, 2 and 3; stages.1's act is read at its inner ReLU
    torch.testing.assert_close(fused, timm_maps, rtol=1e-5, atol=1e-6 * float(timm_maps.abs().max()))


def test_output_layer_resolution(tiny_config, tiny_weights) -> None:
    model = load_model(tiny_config("tiny_hb"), tiny_weights("tiny_hb"))
    assert resolve_output_layer(model, None) == "stages.3"
    # the Python API numbers stages and blocks from 0, like the modules (1 = the paper's stage 2)
    for stage_two in (1, "1", LayerRef(1), "S2", "stages.1"):
        assert resolve_output_layer(model, stage_two) == "stages.1", stage_two
    for block in ((2, 0), "2.0", "S3 B1", "stages.2.blocks.0"):
        assert resolve_output_layer(model, block) == "stages.2.blocks.0", block
    assert resolve_output_layer(model, "stages.2.blocks.0.token_mixer") == "stages.2.blocks.0.token_mixer"
    assert resolve_output_layer(model, "") == ""
    for bad, message in (("7", "stage 8 does not exist; the model has stages 1-4"), ("stages.9", "stage 10 does"),
                         ("2.1", "block 2 of stage 3 does not exist"), ("S0", "numbered from 1"),
                         ("head.nothing", "no layer 'head.nothing'")):
        with pytest.raises(HpxError, match=message):
            resolve_output_layer(model, bad)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    """Interrupted in batch 3 of 3, the run keeps the sums of batches 1-2 (saved as the loop stops);
    the rerun computes batch 3 only and equals the uninterrupted run; a third run reuses the finished one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 5, padding=2), _Square(), nn.Conv2d(2, 2, 3, padding=1)).eval()
    inputs = torch.randn(5, 3, 17, 17)
    reference = effective_receptive_field(model, inputs, layer="", batch_size=2, progress=False)

    calls = {"count": 0}

    def interrupt_third_batch(_module, _args):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_third_batch)
    with pytest.raises(KeyboardInterrupt):
        effective_receptive_field(model, inputs, layer="", batch_size=2, resume_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*/rank0-of-1.npz"))) == 1
    calls["count"] = 10  # count the resumed run's passes without interrupting
    resumed = effective_receptive_field(model, inputs, layer="", batch_size=2, resume_dir=tmp_path, progress=False)
    assert calls["count"] == 11  # only the last batch (image 5) was computed
    np.testing.assert_array_equal(resumed.arrays["maps"], reference.arrays["maps"])
    assert resumed.arrays["used"][0] == 5
    options = resumed.meta["options"]
    assert (options["batches_resumed"], options["batches_computed"], options["world_size"]) == (2, 1, 1)
    again = effective_receptive_field(model, inputs, layer="", batch_size=2, resume_dir=tmp_path, progress=False)
    handle.remove()
    assert calls["count"] == 11 and again.meta["options"]["batches_computed"] == 0
    np.testing.assert_array_equal(again.arrays["maps"], reference.arrays["maps"])


def test_cli_writes_figure_and_result_and_replots(tmp_path, tiny_config, tiny_weights) -> None:
    runner = CliRunner()
    args = ["erf", "-m", tiny_config("tiny_hpx"), "-m", tiny_config("tiny_hpx_sc"), "-w", "random",
            "--input-size", "64", "--num-images", "2", "--batch-size", "2", "--device", "cpu", "-o", str(tmp_path)]
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    stem = tmp_path / "erf_tiny_hpx+tiny_hpx_sc"
    for suffix in (".pdf", ".png", ".npz", ".json", ".figure.json"):
        assert stem.with_name(stem.name + suffix).is_file(), suffix
    saved = ERFResult.load(stem.with_suffix(".npz"))
    assert saved.labels == ["tiny_hpx", "tiny_hpx_sc"]
    assert saved.arrays["maps"].shape == (2, 64, 64) and list(saved.arrays["used"]) == [2, 2]
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert set(meta["models"][0]["area_ratios"]) == {"0.2", "0.3", "0.5", "0.99"}
    assert meta["inputs"] == ["astronaut", "chelsea"] and meta["options"]["seed"] == 0
    assert (meta["options"]["batches_total"], meta["options"]["batches_computed"]) == (2, 2)  # 1 batch x 2 models
    rerun = runner.invoke(app, args)  # the finished runs under OUT/runs are reused
    assert rerun.exit_code == 0, rerun.output
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert (meta["options"]["batches_resumed"], meta["options"]["batches_computed"]) == (2, 0)
    np.testing.assert_array_equal(ERFResult.load(stem.with_suffix(".npz")).arrays["maps"], saved.arrays["maps"])

    png = stem.with_suffix(".png")
    png.unlink()
    replot = runner.invoke(app, ["erf", "--replot", str(stem.with_suffix(".npz")), "--shared-scale"])
    assert replot.exit_code == 0, replot.output
    assert png.is_file()
    elsewhere = tmp_path / "replotted"
    replot = runner.invoke(app, ["erf", "--replot", str(stem.with_suffix(".npz")), "-o", str(elsewhere), "-m", "x"])
    assert replot.exit_code == 0 and "--model ignored" in replot.output, replot.output
    assert (elsewhere / png.name).is_file()


def test_cli_kim_convention_and_bad_input(tmp_path, tiny_config, tiny_weights) -> None:
    runner = CliRunner()
    base = ["erf", "-m", tiny_config("tiny_hb"), "-w", tiny_weights("tiny_hb"), "--input-size", "64", "--num-images", "1",
            "--device", "cpu", "-o", str(tmp_path)]
    without_size = [arg for arg in base if arg not in ("--input-size", "64")]
    outcome = runner.invoke(app, without_size + ["--convention", "kim2023", "--layers", "3"])
    assert outcome.exit_code == 0, outcome.output
    meta = json.loads((tmp_path / "erf_tiny_hb.json").read_text())
    assert meta["convention"] == "kim2023" and meta["models"][0]["layer"] == "stages.2"
    assert meta["options"]["input_size"] == [64, 64] and meta["options"]["size_override"] is None  # pretrained size
    assert set(meta["models"][0]["gaussian"]) == {"amplitude", "x0", "y0", "sigma_x", "sigma_y", "sigma_x_rel",
                                                  "sigma_y_rel", "r2"}
    assert set(meta["models"][0]["radial_mass"]) == {"px", "relative"}
    assert "Gaussian fit (OpenERF)" in outcome.output
    bad = runner.invoke(app, base + ["--convention", "gaussian"])
    assert bad.exit_code == 2 and "Invalid value for '--convention'" in bad.output and "'gaussian'" in bad.output
    bad_size = runner.invoke(app, without_size + ["--input-size", "0"])
    assert isinstance(bad_size.exception, HpxError) and "input size" in str(bad_size.exception)


@pytest.mark.parametrize("option, hooked", [("S2", "stages.1"), ("2", "stages.1"), ("S2B1", "stages.1.blocks.0"),
                                            ("2.1", "stages.1.blocks.0"), ("stages.1", "stages.1"),
                                            ("stages.1.blocks.0.token_mixer", "stages.1.blocks.0.token_mixer")])
def test_cli_layer_is_numbered_from_one_as_in_the_paper(tmp_path, tiny_config, tiny_weights, option, hooked) -> None:
    """``--layers S2`` and ``--layers 2`` hook the output of the paper's stage 2, ``stages.1``; module paths
    are taken as the modules number them."""
    outcome = CliRunner().invoke(app, ["erf", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"), "--input-size",
                                       "32", "--num-images", "1", "--device", "cpu", "-o", str(tmp_path),
                                       "--layers", option])
    assert outcome.exit_code == 0, outcome.output
    meta = json.loads((tmp_path / "erf_tiny_hpx.json").read_text())
    assert meta["models"][0]["layer"] == meta["options"]["layer"] == hooked
    bad = CliRunner().invoke(app, ["erf", "-m", tiny_config("tiny_hpx"), "-w", "random", "--layers", "0",
                                   "-o", str(tmp_path)])
    assert isinstance(bad.exception, HpxError) and "numbered from 1" in str(bad.exception)


@pytest.mark.distributed
def test_torchrun_two_processes_match_single(tmp_path, tiny_config, tiny_weights) -> None:
    """2-process gloo run over 5 images (one unreadable), batch 1: rank 0 sums batches 1, 3, 5, rank 1
    batches 2, 4; the all-reduced maps and counts equal the single-process run's."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img2_corrupt.png").write_bytes(b"not a png")
    args = ["erf", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"), "--images", str(folder),
            "--num-images", "5", "--input-size", "32", "--batch-size", "1", "--device", "cpu"]
    done = torchrun(args, tmp_path / "dist", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    single = one_process(args + ["--no-resume"], tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    dist, one = (ERFResult.load(tmp_path / run / "erf_tiny_hpx.npz") for run in ("dist", "one"))
    np.testing.assert_allclose(dist.arrays["maps"], one.arrays["maps"], rtol=1e-6, atol=0)
    assert dist.meta["models"][0]["images_used"] == one.meta["models"][0]["images_used"] == 4
    assert dist.meta["models"][0]["images_unreadable"] == one.meta["models"][0]["images_unreadable"] == 1
    assert (dist.meta["options"]["world_size"], one.meta["options"]["world_size"]) == (2, 1)
    assert one.meta["options"]["batches_computed"] == one.meta["options"]["batches_total"] == 5
    assert (dist.meta["options"]["batches_total"], dist.meta["options"]["batches_computed"]) == (5, 5)  # all ranks
    assert sorted(p.name for p in (tmp_path / "dist" / "runs").glob("*/*.npz")) == ["rank0-of-2.npz",
                                                                                   "rank1-of-2.npz"]


def test_bf16_autocast_approximates_float32(tiny_config, tiny_weights) -> None:
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    inputs = torch.randn(2, 3, 64, 64)
    exact = effective_receptive_field(model, inputs, progress=False).arrays["maps"][0]
    low = effective_receptive_field(model, inputs, amp="bf16", progress=False).arrays["maps"][0]
    assert np.isfinite(low).all()
    assert np.corrcoef(exact.ravel(), low.ravel())[0, 1] > 0.95
    with pytest.raises(HpxError):
        effective_receptive_field(model, inputs, amp="int8", progress=False)


@pytest.mark.parametrize("first_scale", [2.0 ** 12, 2.0 ** 20])
def test_fp16_keeps_the_far_tails(tiny_config, monkeypatch, first_scale) -> None:
    """Unscaled fp16 gradients flush the ERF's tails to zero (14.8% zero pixels against float32's 11.7% on this
    model); the scaled ones keep them. A first factor of 2**20 overflows float16 at once and is retried smaller."""
    import hpx_analysis.analyzers.erf as erf

    monkeypatch.setattr(erf, "FP16_FIRST_SCALE", first_scale)
    model = load_model(tiny_config("tiny_hpx"), "random", seed=0)
    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with analysis_mode(model):
        layer = resolve_output_layer(model, None)
        exact = erf_gradient_maps(model, inputs, layer)
        half = erf_gradient_maps(model, inputs, layer, amp_dtype=torch.float16)
    assert torch.isfinite(half).all()
    assert abs(float((half == 0).float().mean() - (exact == 0).float().mean())) < 0.002
    assert float((half - exact).abs().max() / exact.max()) < 5e-3


# -- several layers, input sizes and the gradient's nonlinearity -------------------------------------------------------

def _assert_rows_equal(result: ERFResult, row: int, single: ERFResult) -> None:
    """Row ``row`` of ``result`` equals the one row of ``single``: map to 1e-6 of its maximum, the display map, the
    counts and the area ratios."""
    expected = single.row_map(0)
    np.testing.assert_allclose(result.row_map(row), expected, rtol=1e-6, atol=1e-6 * expected.max())
    np.testing.assert_allclose(result.row_map(row, "display"), single.row_map(0, "display"), rtol=1e-6, atol=1e-7)
    entry, alone = result.meta["models"][row], single.meta["models"][0]
    assert (entry["layer"], entry["input_size"], entry["images_used"]) == (alone["layer"], alone["input_size"],
                                                                           alone["images_used"])
    assert entry["area_ratios"] == alone["area_ratios"]


@pytest.mark.parametrize("convention", ["replknet", "kim2023"])
def test_several_layers_equal_the_separate_single_layer_runs(tiny_config, tiny_weights, convention) -> None:
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    inputs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers = [LayerRef(0), 1, "S3 B1", "stages.3"]  # any of the Python API's forms, numbered from 0
    together = effective_receptive_field(model, inputs, layer=layers, convention=convention, batch_size=2,
                                         progress=False)
    paths = ["stages.0", "stages.1", "stages.2.blocks.0", "stages.3"]
    assert together.layers == paths and together.meta["options"]["layers"] == paths
    assert together.arrays["maps"].shape == (4, 64, 64) and list(together.arrays["used"]) == [3] * 4
    assert "layer" not in together.meta["options"] and together.meta["options"]["input_size"] == [64, 64]
    assert len({entry["run_key"] for entry in together.meta["models"]}) == 1  # one run
    for row, layer in enumerate(layers):
        alone = effective_receptive_field(model, inputs, layer=layer, convention=convention, batch_size=2,
                                          progress=False)
        _assert_rows_equal(together, row, alone)
        if convention == "kim2023":
            assert together.meta["models"][row]["gaussian"] == pytest.approx(alone.meta["models"][0]["gaussian"],
                                                                             rel=1e-5)


def test_several_layers_take_one_forward_per_batch_and_one_backward_per_layer(tiny_config, tiny_weights) -> None:
    """Three batches, layers S1..S3: the stem runs forward three times and backward three times per batch; the last
    stage, deeper than every layer asked for, never runs."""
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    calls = {"forward": 0, "backward": 0, "last stage": 0}
    hooks = [model.stem.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1)),
             model.stem.register_full_backward_hook(lambda *_: calls.__setitem__("backward", calls["backward"] + 1)),
             model.stages[3].register_forward_hook(lambda *_: calls.__setitem__("last stage", calls["last stage"] + 1))]
    effective_receptive_field(model, torch.randn(5, 3, 32, 32), layer=[0, 1, 2], batch_size=2, progress=False)
    for hook in hooks:
        hook.remove()
    assert calls == {"forward": 3, "backward": 9, "last stage": 0}


def test_several_sizes_and_layers_equal_the_separate_runs(tiny_config, tiny_weights) -> None:
    """Sizes x layers from the same image files: one row per (size, layer), size-major; the 32 px rows are padded
    with NaN to 64 px in the arrays and given at their own size by ``row_map``."""
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    images = sample_images(2)
    result = effective_receptive_field(model, images, input_size=[64, 32], layer=[1, 3], batch_size=2,
                                       progress=False)
    assert [(entry["input_size"], entry["layer"]) for entry in result.meta["models"]] == [
        ([64, 64], "stages.1"), ([64, 64], "stages.3"), ([32, 32], "stages.1"), ([32, 32], "stages.3")]
    assert result.sizes == [(64, 64), (32, 32)] and result.meta["options"]["input_sizes"] == [64, 32]
    assert not set(ROW_OPTIONS) & set(result.meta["options"])  # the rows differ in every one
    assert np.isnan(result.arrays["maps"][2:, 32:]).all() and np.isfinite(result.row_map(2)).all()
    assert result.meta["options"]["batches_computed"] == 2  # one run (one batch) per size
    for row, (size, layer) in enumerate([(64, 1), (64, 3), (32, 1), (32, 3)]):
        alone = effective_receptive_field(model, images, input_size=size, layer=layer, batch_size=2, progress=False)
        _assert_rows_equal(result, row, alone)
        assert result.meta["models"][row]["transform"] == alone.meta["options"]["transform"]


def test_a_run_at_one_size_is_reused_by_a_request_that_includes_it(tiny_config, tiny_weights, tmp_path) -> None:
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    first = effective_receptive_field(model, sample_images(1), input_size=32, layer=[1, 3], resume_dir=tmp_path,
                                      progress=False)
    both = effective_receptive_field(model, sample_images(1), input_size=[32, 64], layer=[1, 3], resume_dir=tmp_path,
                                     progress=False)
    assert (both.meta["options"]["batches_resumed"], both.meta["options"]["batches_computed"]) == (1, 1)
    np.testing.assert_array_equal(both.arrays["maps"][:2, :32, :32], first.arrays["maps"])


def test_several_sizes_and_layers_are_refused_where_they_cannot_be(tiny_config, tiny_weights) -> None:
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    inputs = torch.randn(1, 3, 32, 32)
    for options, message in (({"input_size": [32, 64]}, "a prepared image tensor has one size"),
                             ({"input_size": [32, 32]}, "input size 32 is given twice"),
                             ({"layer": [1, "stages.1"]}, "layer 'stages.1' is named twice"),
                             ({"layer": []}, "no layer given"), ({"gradient": "square"}, "unknown ERF gradient")):
        with pytest.raises(HpxError, match=message):
            effective_receptive_field(model, inputs, progress=False, **options)
    assert effective_receptive_field(model, inputs, input_size=[32], layer=[2], progress=False).layers == ["stages.2"]
    import timm

    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(HpxError, match="runs only at its build size, so it takes one input size, not 2"):
        effective_receptive_field(vit.eval(), sample_images(1), input_size=[64, 32], progress=False)


class _SignedConv(nn.Module):
    """One 5x5 convolution with signed weights: the input gradient of its centre output has both signs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 5, padding=2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("convention", ["replknet", "kim2023"])
def test_abs_gradient_is_the_absolute_input_gradient(convention, tmp_path) -> None:
    """By hand: g = d scalar / d input per image; replknet maps relu(g) or |g| summed over RGB, kim2023 relu or
    |.| of g averaged over RGB; the mean over images (kim2023: normalised to sum 1). abs differs from relu, and
    its run is another run (key) with the gradient in the metadata."""
    model = _SignedConv().eval()
    inputs = torch.rand(3, 3, 15, 15, generator=torch.Generator().manual_seed(1)) + 0.5
    x = inputs.clone().requires_grad_(True)
    centre = model(x)[:, :, 7, 7]
    scalar = torch.relu(centre).sum() if convention == "replknet" else centre.mean(dim=1).sum()
    (grad,) = torch.autograd.grad(scalar, x)
    assert (grad < 0).any() and (grad > 0).any()
    results = {}
    for gradient, nonlinearity in (("relu", torch.relu), ("abs", torch.abs)):
        per_image = (nonlinearity(grad).sum(dim=1) if convention == "replknet"
                     else nonlinearity(grad.mean(dim=1))).double().mean(dim=0).numpy()
        expected = per_image if convention == "replknet" else per_image / per_image.sum()
        results[gradient] = effective_receptive_field(model, inputs, layer="", convention=convention,
                                                      gradient=gradient, resume_dir=tmp_path, progress=False)
        np.testing.assert_allclose(results[gradient].arrays["maps"][0], expected, rtol=1e-6, atol=1e-12)
        assert results[gradient].meta["options"]["gradient"] == gradient
    assert not np.allclose(results["abs"].arrays["maps"], results["relu"].arrays["maps"], rtol=0.05)
    assert results["abs"].meta["models"][0]["run_key"] != results["relu"].meta["models"][0]["run_key"]


def test_cli_several_models_sizes_and_layers_write_one_result_and_resume(tmp_path, tiny_config, tiny_weights) -> None:
    runner = CliRunner()
    args = ["erf", "-m", tiny_config("tiny_hpx"), "-m", tiny_config("tiny_hpx_sc"), "-w", tiny_weights("tiny_hpx"),
            "-w", "random", "--input-size", "32,64", "--layers", "S1,S2", "--layers", "S4", "--gradient", "abs",
            "--num-images", "2", "--batch-size", "2", "--device", "cpu", "-o", str(tmp_path)]
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    stem = tmp_path / "erf_tiny_hpx+tiny_hpx_sc"
    files = ([stem.name + suffix for suffix in (".npz", ".json", ".pdf", ".png", ".figure.json")]
             + [f"{stem.name}_area_by_{axis}{suffix}" for axis in ("layer", "size")
                for suffix in (".pdf", ".png", ".figure.json")])
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == sorted(files)
    assert [line[len("wrote "):] for line in outcome.stdout.splitlines() if line.startswith("wrote ")] == [
        str(tmp_path / name) for name in files]
    saved = ERFResult.load(stem.with_suffix(".npz"))
    rows = [(label, side, layer) for label in ("tiny_hpx", "tiny_hpx_sc") for side in (32, 64)
            for layer in ("stages.0", "stages.1", "stages.3")]
    assert [(e["label"], e["input_size"][0], e["layer"]) for e in saved.meta["models"]] == rows
    options = saved.meta["options"]
    assert (options["gradient"], options["input_sizes"], options["layers"]) == ("abs", [32, 64],
                                                                                ["stages.0", "stages.1", "stages.3"])
    assert (options["batches_total"], options["batches_computed"]) == (4, 4)  # 2 models x 2 sizes, one batch each
    assert "tiny_hpx_sc stages.3 @ 64 px: 2 images used" in outcome.stdout

    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    alone = effective_receptive_field(model, sample_images(2), input_size=64, layer=1, gradient="abs",
                                      batch_size=2, progress=False)
    _assert_rows_equal(saved, rows.index(("tiny_hpx", 64, "stages.1")), alone)

    rerun = runner.invoke(app, args)  # every run under OUT/runs is reused
    assert rerun.exit_code == 0, rerun.output
    options = ERFResult.load(stem.with_suffix(".npz")).meta["options"]
    assert (options["batches_resumed"], options["batches_computed"]) == (4, 0)
    replot = runner.invoke(app, ["erf", "--replot", str(stem.with_suffix(".npz")), "--shared-scale"])
    assert replot.exit_code == 0, replot.output
    assert len([line for line in replot.stdout.splitlines() if line.startswith("wrote ")]) == 9
    bad = runner.invoke(app, args[:9] + ["--input-size", "32,large"])
    assert isinstance(bad.exception, HpxError) and "whole numbers of pixels" in str(bad.exception)


def test_results_saved_before_several_layers_load_and_draw(tmp_path) -> None:
    """A result as written before rows had sizes: one size, rows with no input_size or transform."""
    maps = np.random.default_rng(0).random((2, 9, 9))
    entries = [{"label": name, "model": {"model": name}, "layer": "stages.3", "images_used": 1,
                "images_skipped_nonfinite": 0, "images_unreadable": 0, "area_ratios": area_ratios(display_map(m)),
                "run_key": None} for name, m in zip(("a", "b"), maps)]
    old = ERFResult(arrays={"maps": maps, "display": np.stack([display_map(m) for m in maps]).astype(np.float32),
                            "used": np.array([1, 1]), "skipped": np.array([0, 0])},
                    meta={"convention": "replknet", "models": entries, "inputs": ["x"],
                          "options": {"input_size": [9, 9], "size_override": None, "transform": "t",
                                      "layer": "stages.3", "convention": "replknet", "batch_size": 1, "amp": None}})
    old.save(tmp_path / "old")
    loaded = ERFResult.load(tmp_path / "old.npz")
    assert loaded.sizes == [(9, 9)] and loaded.layers == ["stages.3"] and loaded.caption(1) == "b"
    np.testing.assert_array_equal(loaded.row_map(1), maps[1])
    outcome = CliRunner().invoke(app, ["erf", "--replot", str(tmp_path / "old.npz")])
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "old.png").is_file() and not (tmp_path / "old_area_by_layer.png").exists()
