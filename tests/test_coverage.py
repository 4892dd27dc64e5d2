"""Learned filter-size coverage: analytic window diameters, conventions per mixer kind, the CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hpx_analysis.analyzers.coverage import CoverageResult, compute_coverage
from hpx_analysis.errors import HpxError
from hpx_analysis.inspection import kernel, list_mixers
from hpx_analysis.interventions import modify_kernels
from hpx_analysis.models.hyenapixel import HyenaPixelFormer
from hpx_analysis.models.long_filters import HyenaFilter1D, HyenaPixelFilter
from hpx_analysis.models.zoo import load_model
from hpx_analysis_cli.app import app


def largest_tap_distance(radius: float, half: int) -> float:
    """Largest sqrt(i^2 + j^2) <= radius over the taps |i|, |j| <= half (brute force)."""
    return max(math.hypot(i, j) for i in range(half + 1) for j in range(half + 1) if math.hypot(i, j) <= radius)


@pytest.mark.parametrize("radius, shift", [(3.3, 0.0), (5.5, 0.02), (9.7, -0.01), (0.5, 0.0)])
def test_hyenapixel_window_diameter_is_analytic(radius, shift):
    threshold, size = 0.05, 31
    filt = HyenaPixelFilter(channels=2, kernel_size=size, emb_dim=4)
    # exp(-delta d) + shift = threshold exactly at d = radius
    delta = math.log(1 / (threshold - shift)) / radius
    with torch.no_grad():
        filt.deltas.fill_(delta)
        filt.shift.fill_(shift)
    diameters = filt.window_extent(threshold)
    expected = 2 * largest_tap_distance(radius, size // 2) + 1  # in taps: radius 0.5 keeps the centre tap, 1
    np.testing.assert_allclose(diameters.numpy(), [expected, expected], rtol=1e-6)


def test_window_kept_on_seven_taps_covers_like_a_seven_by_seven_conv():
    """At F = 7 (28 px) a 13-tap window kept on distances <= 3, i.e. 7 taps across, gives 7 / 7 = 1.0,
    as the 7 x 7 convolution of a ConvFormer block does (a centre-to-centre diameter would give 6 / 7)."""
    torch.manual_seed(0)
    hyena = HyenaPixelFormer([{"type": "hpx", "long_kernel_size": 13, "filter_emb_dim": 4}], depths=(1,),
                             dims=(8,), num_classes=2)
    for module in hyena.modules():
        if isinstance(module, HyenaPixelFilter):
            with torch.no_grad():   # w(3) = 0.05^(3 / 3.1) >= 0.05 > w(sqrt(10)), the next tap distance
                module.deltas.fill_(math.log(1 / 0.05) / 3.1)
                module.shift.fill_(0.0)
    conv = HyenaPixelFormer([{"type": "sepconv"}], depths=(1,), dims=(8,), num_classes=2)
    for model, kind in ((hyena, "hyenapixel_2d"), (conv, "local_conv")):
        result = compute_coverage(model, input_size=28)
        assert result.layers[0]["kind"] == kind and result.arrays["feature_side"].tolist() == [7]
        np.testing.assert_allclose(result.arrays["channels_0"], 1.0, rtol=1e-6)


def test_window_falling_only_in_the_corners_covers_the_kernel_extent():
    filt = HyenaPixelFilter(channels=1, kernel_size=11, emb_dim=4)   # axis taps reach 5, corners 7.07
    with torch.no_grad():
        filt.deltas.fill_(math.log(1 / 0.05) / 6.0)
    assert filt.window_extent(0.05).item() == 11


def test_hyena_window_coverage_is_analytic():
    length, threshold = 100, 0.05
    filt = HyenaFilter1D(channels=3, seq_len=length, emb_dim=5, hidden=8)
    reach = torch.tensor([10.5, 40.2, 200.0])       # in taps; the last never falls below within 99 taps
    with torch.no_grad():   # t = |offset| / (L - 1)
        filt.modulation.deltas.copy_((math.log(1 / threshold) * (length - 1) / reach).view(1, 1, 3))
    coverage = filt.window_extent(threshold) / filt.coverage_length((10, 10))  # L = 100
    # extent in taps: 2 * reach + 1, all 2L - 1 taps for the full window
    np.testing.assert_allclose(coverage.numpy(), [21 / length, 81 / length, (2 * length - 1) / length], rtol=1e-6)
    causal = HyenaFilter1D(channels=2, seq_len=length, emb_dim=5, hidden=8, causal=True)
    with torch.no_grad():   # reach + 1 taps; a full causal window covers the L taps, 1
        causal.modulation.deltas.copy_((math.log(1 / threshold) * (length - 1) / torch.tensor([30.5, 200.0]))
                                       .view(1, 1, 2))
    np.testing.assert_allclose((causal.window_extent(threshold) / length).numpy(), [31 / length, 1.0], rtol=1e-6)


def test_model_whose_shift_exceeds_the_threshold_covers_its_whole_kernel(tiny_config, tiny_weights):
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    for module in model.modules():
        if isinstance(module, HyenaPixelFilter):
            with torch.no_grad():
                module.shift.fill_(0.06)
    result = compute_coverage(model, threshold=0.05, input_size=64)
    expected = [31 / 16, 15 / 8, 7 / 4, 3 / 2]
    for key in ("mean", "median", "p10", "p90"):
        np.testing.assert_allclose(result.arrays[key], expected, rtol=1e-6)
    assert result.arrays["feature_side"].tolist() == [16, 8, 4, 2]
    raised = compute_coverage(model, threshold=0.9, input_size=64)       # now the windows fall below
    assert (raised.arrays["mean"] < np.array(expected)).all()


def test_summaries_match_the_channel_values(tiny_config, tiny_weights):
    result = compute_coverage(load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx")), input_size=64)
    for j in range(len(result.layers)):
        values = result.arrays[f"channels_{j}"]
        assert len(values) == [32, 32, 64, 64][j]
        assert result.arrays["p10"][j] <= result.arrays["median"][j] <= result.arrays["p90"][j]
        assert result.arrays["mean"][j] == pytest.approx(values.mean())
    assert result.stage_coverage(1) == pytest.approx(result.arrays["mean"][1])


def test_attention_counts_two_and_local_convolutions_k_over_f(tiny_config):
    attention = compute_coverage(load_model(tiny_config("tiny_hpx_a"), "random"), input_size=64)
    assert [layer["kind"] for layer in attention.layers] == ["hyenapixel_2d"] * 2 + ["attention"] * 2
    assert attention.arrays["mean"][2:].tolist() == [2.0, 2.0]
    assert np.isnan(attention.stage_coverage(2, kinds=("hyenapixel_2d",)))
    local = compute_coverage(load_model(tiny_config("tiny_c_hpx"), "random"), input_size=64)
    np.testing.assert_allclose(local.arrays["mean"][:2], [7 / 16, 7 / 8])
    with pytest.raises(HpxError, match="threshold"):
        compute_coverage(load_model(tiny_config("tiny_c_hpx"), "random"), threshold=1.5)


def test_cli_writes_figure_table_and_results(tmp_path, tiny_config, tiny_weights):
    runner = CliRunner()
    outcome = runner.invoke(app, ["coverage", "--model", tiny_config("tiny_hpx"), "--model", tiny_config("tiny_hb"),
                                  "--model", tiny_config("tiny_hpx_a"), "--weights", "random", "--input-size", "64",
                                  "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    for name in ("coverage.pdf", "coverage.png", "coverage.figure.json", "coverage.csv", "coverage.json"):
        assert (tmp_path / name).is_file()
    with open(tmp_path / "coverage.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["tiny_hpx"] * 4 + ["tiny_hb"] * 4 + ["tiny_hpx_a"] * 4
    assert [float(row["mean"]) for row in rows[-2:]] == [2.0, 2.0]
    summary = json.loads((tmp_path / "coverage.json").read_text())
    assert summary["threshold"] == 0.05 and len(summary["layers"]) == 12
    saved = CoverageResult.load(tmp_path / "coverage_tiny_hb.npz")
    assert [layer["kind"] for layer in saved.layers] == ["hyena_1d"] * 4
    assert float(rows[4]["mean"]) == pytest.approx(saved.arrays["mean"][0])


# -- energy coverage ------------------------------------------------------------------------------------------------

def _smallest_disc_extent(weights: np.ndarray, share: float) -> float:
    """Brute force: 2 r + 1 for the smallest tap distance r from the centre of an odd (S, S) array whose disc
    holds ``share`` of the absolute weight."""
    half = weights.shape[0] // 2
    taps = [(math.hypot(i - half, j - half), abs(weights[i, j])) for i in range(weights.shape[0])
            for j in range(weights.shape[1])]
    total = sum(w for _, w in taps)
    for radius in sorted({d for d, _ in taps}):
        if sum(w for d, w in taps if d <= radius) >= share * total:
            return 2 * radius + 1
    raise AssertionError("unreachable")


def test_uniform_seven_by_seven_block_energy_extent_is_the_smallest_disc_holding_95_percent():
    from hpx_analysis.analyzers.coverage import energy_extent
    from hpx_analysis.models.long_filters import centre_distance_map
    canvas = torch.zeros(2, 15, 15)
    canvas[:, 4:11, 4:11] = 1.0
    canvas[1] *= -3.0  # absolute weight: the sign and scale do not matter
    expected = _smallest_disc_extent(canvas[0].numpy(), 0.95)
    assert expected == pytest.approx(2 * math.sqrt(18) + 1)  # 47 of 49 taps need the corners' ring (45 inside sqrt 13)
    extent = energy_extent(canvas, centre_distance_map(15), 0.95, max_extent=15)
    np.testing.assert_allclose((extent / 7).numpy(), [expected / 7] * 2, rtol=1e-6)  # float32 distances
    assert energy_extent(canvas, centre_distance_map(15), 45 / 49, 15)[0] == pytest.approx(2 * math.sqrt(13) + 1)
    assert energy_extent(torch.zeros(1, 15, 15), centre_distance_map(15), 0.95, 15).tolist() == [0.0]


def _centre_only(kernel: torch.Tensor, _info) -> torch.Tensor:
    mask = torch.zeros_like(kernel)
    mask[(slice(None), *(n // 2 for n in kernel.shape[1:]))] = 1
    return kernel * mask


def test_kernels_with_all_weight_on_the_centre_tap_cover_one_over_f(tiny_config, tiny_weights):
    """HyenaPixel and SLaK / RepLKNet effective kernels cut to their centre tap: energy coverage 1 / F per channel;
    SLaK and RepLKNet window coverage is K / F."""
    import timm

    from hpx_analysis.interventions import modify_kernels
    hpx = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    slak = timm.create_model("slak_tiny", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=(13, 11, 9, 5),
                             small_kernel=3, num_classes=4).eval()
    replknet = timm.create_model("replknet_31b", layers=(1, 1, 1, 1), channels=(8, 8, 8, 8),
                                 large_kernel_sizes=(13, 11, 9, 5), small_kernel=3, num_classes=4).eval()
    for model in (hpx, slak, replknet):
        with modify_kernels(model, _centre_only):
            result = compute_coverage(model, input_size=64)
        sides = result.arrays["feature_side"]
        for j in range(len(result.layers)):
            np.testing.assert_allclose(result.arrays[f"energy_channels_{j}"], 1 / sides[j], rtol=1e-12)
        assert result.meta["energy_share"] == 0.95
    assert [layer["kind"] for layer in result.layers] == ["large_conv"] * 4
    np.testing.assert_allclose(result.arrays["mean"], np.array([13, 11, 9, 5]) / np.array([16, 8, 4, 2]))
    untouched = compute_coverage(slak, input_size=64)  # an unmodified cross reaches at least its strip width
    assert np.all(untouched.arrays["energy_mean"] > 1 / untouched.arrays["feature_side"])


def test_hyena_kernel_wrapped_onto_the_map_covers_like_the_2d_block(tiny_config):
    """A 1D kernel whose taps are the offsets a * W + b of a uniform 7 x 7 block (|a|, |b| <= 3) wraps back onto
    that block, so its energy coverage equals the 2D one on the same map; mixers without a long filter get NaN."""
    from hpx_analysis.analyzers.coverage import energy_coverage
    from hpx_analysis.inspection import list_mixers
    info = next(i for i in list_mixers(load_model(tiny_config("tiny_hb"), "random"), 64) if i.kind == "hyena_1d")
    height, width = info.feature_size
    filt = info.long_filter
    planted = torch.zeros(filt.channels, filt.num_taps)
    centre = filt.centre[0]
    for a in range(-3, 4):
        for b in range(-3, 4):
            planted[:, centre + a * width + b] = 1.0
    block = np.zeros((15, 15))
    block[4:11, 4:11] = 1.0
    with filt.override_kernel(planted):
        values = energy_coverage(info, 0.95)
    np.testing.assert_allclose(values, _smallest_disc_extent(block, 0.95) / max(height, width), rtol=1e-6)
    attention = compute_coverage(load_model(tiny_config("tiny_hpx_a"), "random"), input_size=64)
    assert np.isnan(attention.arrays["energy_mean"][2:]).all() and not np.isnan(attention.arrays["energy_mean"][:2]).any()


def test_cli_draws_several_models_each_with_its_own_weights(tiny_config, tiny_weights, tmp_path) -> None:
    """One --weights per --model, in order (HyenaPixel and Hb files side by side); a count that fits neither
    rule is a usage error."""
    from typer.testing import CliRunner

    from hpx_analysis.analyzers.coverage import CoverageResult
    from hpx_analysis_cli.app import app

    runner = CliRunner()
    args = ["coverage", "-m", tiny_config("tiny_hpx"), "-m", tiny_config("tiny_hb"), "-w", tiny_weights("tiny_hpx"),
            "-w", tiny_weights("tiny_hb"), "--input-size", "64", "--out", str(tmp_path)]
    outcome = runner.invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    for name in ("tiny_hpx", "tiny_hb"):
        meta = CoverageResult.load(tmp_path / f"coverage_{name}").meta["model"]
        assert meta["weights_file"].endswith(f"{name}.safetensors") and meta["weights"] == "file"
    bad = runner.invoke(app, args + ["-w", "random"])
    assert bad.exit_code == 2 and "one --weights for all models or one per --model: got 3 for 2 models" in bad.output


def test_models_with_other_blocks_and_stages_are_drawn_over_relative_depth(tiny_config, tiny_weights) -> None:
    """tiny_hpx (4 stages of 1 block) beside a 4-block ViT (one stage): block indices would put unlike stages
    side by side, so both are drawn at (block + 1/2) / blocks; a shared layout keeps block indices."""
    import timm

    from hpx_analysis.plotting.coverage import plot_coverage

    hpx = compute_coverage(load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx")), input_size=64)
    torch.manual_seed(0)
    vit = compute_coverage(timm.create_model("hyena_deit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32,
                                             depth=4, num_heads=2))
    figure = plot_coverage([hpx, vit])
    axes = figure.axes[0]
    assert axes.get_xlabel().startswith("relative depth")
    means = [line for line in axes.get_lines() if line.get_marker() == "o"]
    for line in means:
        np.testing.assert_allclose(line.get_xdata(), [0.125, 0.375, 0.625, 0.875])
    assert plot_coverage([hpx, hpx]).axes[0].get_xlabel() == "block index through the network"


# -- Hyena N-D: window and energy coverage on one scale per block layout --------------------------------------------

HND_SIDE = 8  # L: tokens per side of the small Hyena N-D ViTs below (64 px, patch 8)


def _small_hyena_nd(directions: str, window_mode: str) -> torch.nn.Module:
    """A 4-block Hyena N-D ViT on an 8 x 8 token grid (``seq``: seq and standard blocks alternate)."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("hyena_deit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=16, depth=4,
                             num_heads=2, filter_width=8, directions=directions, window=window_mode).eval()


def _flat_on_block_taps(k: torch.Tensor, info) -> torch.Tensor:
    """Ones on the taps of the (C, 2L-1, 2L-1) canvas that the block applies (true-convolution orientation, centre
    L-1): the quadrant of non-negative offsets (standard), of non-positive ones (seq), the whole canvas (4dir)."""
    side = (k.shape[-1] + 1) // 2
    rows = {"standard": slice(side - 1, None), "seq": slice(None, side), "4dir": slice(None)}[info.module.direction]
    flat = torch.zeros_like(k)
    flat[:, rows, rows] = 1.0
    return flat


@torch.no_grad()
def test_flat_hyena_nd_kernels_cover_alike_in_both_measures():
    """No window and a flat kernel on every tap the block applies: a one-sided (causal or anti-causal) block covers
    its L taps per axis, 1 in both measures; a 4dir block its 2L-1, (2L-1)/L in both."""
    for directions, expected, taps in (("standard", 1.0, HND_SIDE ** 2), ("seq", 1.0, HND_SIDE ** 2),
                                       ("4dir", (2 * HND_SIDE - 1) / HND_SIDE, (2 * HND_SIDE - 1) ** 2)):
        model = _small_hyena_nd(directions, "no")
        with modify_kernels(model, _flat_on_block_taps) as modified:
            assert all(kernel(info).sum(dim=(-2, -1)).eq(taps).all() for info in modified)
            result = compute_coverage(model)
        assert [layer["kind"] for layer in result.layers] == ["hyena_nd"] * 4
        for j in range(4):
            np.testing.assert_allclose(result.arrays[f"channels_{j}"], expected, rtol=1e-6)
            np.testing.assert_allclose(result.arrays[f"energy_channels_{j}"], expected, rtol=1e-6)


@torch.no_grad()
def test_one_sided_hyena_nd_kernel_of_reach_r_covers_r_plus_one_taps_in_both_measures():
    """seq and standard blocks whose window keeps the taps up to R along each axis, their kernel all on the centre
    tap (R = 0) or on the tap R along an axis on the block's side (R = 3): both measures give (R + 1) / L."""
    model = _small_hyena_nd("seq", "learn")
    threshold, side = 0.05, HND_SIDE
    for reach in (0, 3):
        rate = (side - 1) * math.log(1 / threshold) / (reach + 0.5)  # tap i at t = i / (L-1): kept for i <= R
        for info in list_mixers(model):
            for name in ("Xdeltas", "Ydeltas"):
                getattr(info.module.filter_fn.modulation, name).fill_(rate)

        def tap_at_reach(k: torch.Tensor, info) -> torch.Tensor:
            sign = -1 if info.module.direction == "seq" else 1
            single = torch.zeros_like(k)
            single[:, side - 1, side - 1 + sign * reach] = -2.0
            return single

        with modify_kernels(model, tap_at_reach):
            result = compute_coverage(model, threshold=threshold)
        assert {info.module.direction for info in list_mixers(model)} == {"seq", "standard"}
        for j in range(4):
            np.testing.assert_allclose(result.arrays[f"channels_{j}"], (reach + 1) / side, rtol=1e-6)
            np.testing.assert_allclose(result.arrays[f"energy_channels_{j}"], (reach + 1) / side, rtol=1e-6)
