"""Kernel pictures: the 1D wrap-around mapping, one orientation for 2D and 1D layers, channel reductions,
normalisations, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from hpx_analysis.analyzers.kernels import KernelsResult, compute_kernels, normalise, reduce_channels, wrap_taps
from hpx_analysis.errors import HpxError
from hpx_analysis.inspection import kernel, long_filter_layers
from hpx_analysis.interventions import modify_kernels
from hpx_analysis.layer_names import LayerRef, parse_layers
from hpx_analysis.models import fft_conv_same
from hpx_analysis.models.zoo import load_model
from hpx_analysis_cli.app import app


@pytest.fixture(scope="module")
def tiny_hb(tiny_weights):
    from tests.conftest import TINY
    return load_model(str(TINY / "tiny_hb.json"), tiny_weights("tiny_hb"))


@pytest.mark.parametrize("orientation", ["response", "kernel"])
@pytest.mark.parametrize("position", [(2, 3), (0, 0), (4, 6), (1, 0)])
def test_taps_encoding_their_offsets_land_where_they_read(position, orientation):
    height, width = 5, 7
    length = height * width
    offsets = np.arange(2 * length - 1) - (length - 1)          # tap j holds its own offset d
    wrapped = wrap_taps(offsets.astype(float), length - 1, (height, width), position, orientation)
    evaluation = position[0] * width + position[1]
    rows, cols = np.nonzero(~np.isnan(wrapped.values))
    flat = (rows + wrapped.first_row) * width + cols             # flattened pixel index of each picture cell
    # true convolution: the tap of offset d weights pixel p - d; response draws it there, kernel at p + d
    placed_offset = evaluation - flat if orientation == "response" else flat - evaluation
    source = evaluation - placed_offset
    np.testing.assert_array_equal(wrapped.values[rows, cols], placed_offset)
    np.testing.assert_array_equal(wrapped.outside[rows, cols], (source < 0) | (source >= length))
    assert np.count_nonzero(~np.isnan(wrapped.values)) == len(offsets)
    assert np.count_nonzero(~wrapped.outside & ~np.isnan(wrapped.values)) == length  # every pixel seen once
    assert wrapped.values.shape[0] in (2 * height, 2 * height + 1)   # about 2F rows of F columns


def test_wrapped_picture_equals_the_convolution_response():
    """Picture value at pixel q = output at the evaluation pixel for a unit impulse at q."""
    height, width, position = 4, 6, (1, 4)
    length = height * width
    taps = torch.randn(1, 2 * length - 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wrapped = wrap_taps(taps[0].numpy(), length - 1, (height, width), position)
    impulses = torch.eye(length, dtype=torch.float64)[:, None, :]        # (L, 1, L): one impulse per pixel
    response = fft_conv_same(impulses, taps, (length - 1,))[:, 0, position[0] * width + position[1]]
    top = -wrapped.first_row
    np.testing.assert_allclose(wrapped.values[top:top + height].reshape(-1), response.numpy(), atol=1e-5)  # FFT in float32
    assert not wrapped.outside[top:top + height].any()
    assert wrapped.outside[:top][~np.isnan(wrapped.values[:top])].all()


def test_causal_taps_only_reach_back():
    wrapped = wrap_taps(np.arange(6.0), 0, (2, 3), (1, 1))
    evaluation = 4
    rows, cols = np.nonzero(~np.isnan(wrapped.values))
    flat = (rows + wrapped.first_row) * 3 + cols
    assert flat.max() == evaluation and flat.min() == evaluation - 5


def test_reductions_and_normalisations():
    kernels = torch.stack([torch.full((3, 3), 1.0), torch.full((3, 3), -3.0), torch.full((3, 3), 2.0)])
    kernels[:, 1, 1] = torch.tensor([5.0, -1.0, 0.5])
    mean, shown = reduce_channels(kernels, "mean")
    assert shown == [-1] and torch.allclose(mean[0], kernels.mean(0))
    absolute, _ = reduce_channels(kernels, "abs-mean")
    assert torch.allclose(absolute[0, 0, 0], torch.tensor(2.0))
    top, shown = reduce_channels(kernels, "top-k", top_k=2)
    assert shown == [1, 0]                        # energies 33, 73, 32.25
    single, shown = reduce_channels(kernels, 2)
    assert shown == [2] and torch.equal(single[0], kernels[2])
    with pytest.raises(HpxError, match="out of range"):
        reduce_channels(kernels, 3)
    scaled = normalise(kernels, "maxabs")
    assert torch.allclose(scaled.flatten(1).abs().amax(1), torch.ones(3))
    assert torch.equal(torch.sign(scaled), torch.sign(kernels))
    unit = normalise(kernels, "minmax")
    assert torch.allclose(unit.flatten(1).amin(1), torch.zeros(3))
    assert torch.allclose(unit.flatten(1).amax(1), torch.ones(3))


def test_hyenapixel_panels_are_the_normalised_mean_kernels(tiny_config, tiny_weights):
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    result = compute_kernels(model, input_size=64)
    infos = long_filter_layers(model, 64)
    assert [layer["name"] for layer in result.layers] == [info.name for info in infos]
    for i, info in enumerate(infos):
        mean = kernel(info).mean(0).double().numpy()
        np.testing.assert_allclose(result.panels(i)[0], mean / np.abs(mean).max(), rtol=1e-5, atol=1e-7)
        assert result.layers[i]["feature_size"] == [64 // 4 // 2 ** info.stage] * 2
        assert not result.outside(i).any()


@pytest.mark.parametrize("orientation, step", [("kernel", 1), ("response", -1)])
def test_hyena_panels_wrap_the_mean_kernel(tiny_hb, orientation, step):
    result = compute_kernels(tiny_hb, layers=[(1, 0)], input_size=64, normalisation="none", orientation=orientation)
    info = long_filter_layers(tiny_hb, 64)[1]
    taps = kernel(info).mean(0).double().numpy()
    layer = result.layers[0]
    assert layer["position"] == [4, 4] and layer["feature_size"] == [8, 8]
    assert result.meta["options"]["orientation"] == result.orientation == orientation
    top = -layer["first_row"]
    centre_tap = info.long_filter.centre[0]
    assert result.panels(0)[0, top + 4, 4] == pytest.approx(taps[centre_tap], rel=1e-6)
    # kernel: the next tap sits one pixel right of p; response: it weights the pixel left of p
    assert result.panels(0)[0, top + 4, 5] == pytest.approx(taps[centre_tap + step], rel=1e-6)
    assert result.panels(0)[0, top + 5, 4] == pytest.approx(taps[centre_tap + 8 * step], rel=1e-6)  # one row down


PLANTED = torch.arange(1.0, 50.0, dtype=torch.float64).view(7, 7)   # no symmetry: every tap differs from its mirror


def _plant_2d(kernels: Tensor, _info) -> Tensor:
    """(C, S, S) -> the same shape, every channel PLANTED around the centre tap, zero elsewhere."""
    centre = kernels.shape[-1] // 2
    planted = torch.zeros_like(kernels)
    planted[:, centre - 3:centre + 4, centre - 3:centre + 4] = PLANTED.to(kernels)
    return planted


def _plant_1d(kernels: Tensor, info) -> Tensor:
    """(C, T) -> the same shape, every channel the row-major flattening of PLANTED on rows of the map's
    width W around the centre tap: tap c + dr*W + dc = PLANTED[3 + dr, 3 + dc]."""
    width = info.feature_size[1]
    planted = torch.zeros_like(kernels)
    for (row, col), value in np.ndenumerate(PLANTED.numpy()):
        planted[:, info.long_filter.centre[0] + (row - 3) * width + (col - 3)] = value
    return planted


@pytest.mark.parametrize("orientation", ["kernel", "response"])
def test_planted_kernel_shows_the_same_way_round_in_2d_and_1d(tiny_config, tiny_hb, orientation):
    """A 2D kernel and a 1D filter that is its row-major flattening give the same picture (15x15 around
    the evaluation pixel (8, 8) of the 16x16 map, where no tap wraps)."""
    hpx = load_model(tiny_config("tiny_hpx"), "random")
    options = dict(layers=[(0, 0)], input_size=64, normalisation="none", orientation=orientation)
    with modify_kernels(hpx, _plant_2d, layers=["S1 B1"], input_size=64):
        flat = compute_kernels(hpx, **options)
    with modify_kernels(tiny_hb, _plant_1d, layers=["S1 B1"], input_size=64):
        wrapped = compute_kernels(tiny_hb, **options)
    assert flat.panels(0).shape == (1, 31, 31) and wrapped.layers[0]["position"] == [8, 8]
    top = -wrapped.layers[0]["first_row"]
    picture_2d = flat.panels(0)[0, 15 - 7:15 + 8, 15 - 7:15 + 8]
    picture_1d = wrapped.panels(0)[0, top + 8 - 7:top + 8 + 8, 8 - 7:8 + 8]
    np.testing.assert_allclose(picture_1d, picture_2d, rtol=1e-6)
    expected = PLANTED.numpy() if orientation == "kernel" else PLANTED.numpy()[::-1, ::-1]
    np.testing.assert_allclose(picture_2d[4:11, 4:11], expected, rtol=1e-6)


def test_response_is_the_point_reflected_kernel_in_2d(tiny_config, tiny_weights):
    hpx = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    kernel_view = compute_kernels(hpx, input_size=64, orientation="kernel")
    response_view = compute_kernels(hpx, input_size=64, orientation="response")
    for i in range(len(kernel_view.layers)):
        np.testing.assert_array_equal(response_view.panels(i), kernel_view.panels(i)[:, ::-1, ::-1])


def _impulse_weights(filt, feature_size, evaluation) -> np.ndarray:
    """Weight (channel mean) each input pixel gets at the evaluation pixel, by a forward pass of one
    impulse per pixel (in every channel) through the filter's convolution: (H, W)."""
    height, width = feature_size
    impulses = torch.eye(height * width)[:, None, :].expand(-1, filt.channels, -1)   # (HW, C, HW)
    if len(filt.centre) == 2:
        out = filt.convolve(impulses.reshape(-1, filt.channels, height, width)).flatten(2)
    else:
        out = filt.convolve(impulses)
    return out[:, :, evaluation[0] * width + evaluation[1]].mean(1).double().reshape(height, width).numpy()


def test_response_panels_are_the_weights_a_forward_pass_gives(tiny_config, tiny_weights, tiny_hb):
    """Known answer: an impulse at input pixel q through the long filter shows, at the output pixel p,
    the weight of q; ``response`` panels hold exactly that for 2D and 1D layers (8x8 maps, p = (4, 4))."""
    hpx = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    for model in (hpx, tiny_hb):
        info = long_filter_layers(model, 64)[1]
        result = compute_kernels(model, layers=[(1, 0)], input_size=64, normalisation="none",
                                 orientation="response")
        with torch.no_grad():
            weights = _impulse_weights(info.long_filter, (8, 8), (4, 4))
        panel = result.panels(0)[0]
        if result.layers[0]["position"] is None:      # 2D (15, 15): cell 7 + e holds the weight of p + e
            shown = panel[7 - 4:7 + 4, 7 - 4:7 + 4]
        else:                                          # 1D: the image rows of the wrapped picture
            assert result.layers[0]["position"] == [4, 4]
            top = -result.layers[0]["first_row"]
            shown = panel[top:top + 8]
        np.testing.assert_allclose(shown, weights, atol=1e-5 * np.abs(weights).max())  # FFT in float32


def test_layer_selection_keeps_order_and_rejects_unknown(tiny_hb):
    """Command-line text is numbered from 1 (``2.1`` = S2 B1), the Python API from 0 (``(1, 0)`` = S2 B1)."""
    assert parse_layers("2.1, S1B1") == [LayerRef(1, 0), LayerRef(0, 0)]
    assert parse_layers("1.0", one_based=False) == [LayerRef(1, 0)]
    result = compute_kernels(tiny_hb, layers=parse_layers("2.1,S1 B1"), input_size=64)
    assert [layer["name"] for layer in result.layers] == ["S2 B1", "S1 B1"]
    assert result.meta["options"]["layers"] == ["S2 B1", "S1 B1"]
    api = compute_kernels(tiny_hb, layers=[(1, 0), LayerRef(0, 0), "S4", 2], input_size=64)
    assert [layer["name"] for layer in api.layers] == ["S2 B1", "S1 B1", "S4 B1", "S3 B1"]
    with pytest.raises(HpxError, match="block 6 of stage 1 does not exist; stage 1 has blocks 1$"):
        compute_kernels(tiny_hb, layers=[(0, 5)], input_size=64)
    with pytest.raises(HpxError, match="stage 5 does not exist; the model has stages 1-4"):
        compute_kernels(tiny_hb, layers=parse_layers("S5"), input_size=64)
    with pytest.raises(HpxError, match="numbered from 1"):
        parse_layers("0.0")
    with pytest.raises(HpxError, match="outside the 16x16"):
        compute_kernels(tiny_hb, position=(16, 0), input_size=64)
    with pytest.raises(HpxError, match="unknown orientation"):
        compute_kernels(tiny_hb, orientation="flipped", input_size=64)


def test_position_moves_to_the_same_relative_pixel_on_smaller_maps(tiny_hb):
    result = compute_kernels(tiny_hb, position=(12, 4), input_size=64)
    assert [layer["position"] for layer in result.layers] == [[12, 4], [6, 2], [3, 1], [1, 0]]


def test_cli_writes_figure_and_arrays(tmp_path, tiny_config, tiny_weights):
    runner = CliRunner()
    outcome = runner.invoke(app, ["kernels", "--model", tiny_config("tiny_hb"), "--weights", tiny_weights("tiny_hb"),
                                  "--input-size", "64", "--reduction", "top-k", "--top-k", "2",
                                  "--position", "0,3", "--orientation", "response", "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    for suffix in (".pdf", ".png", ".npz", ".json", ".figure.json"):
        assert (tmp_path / f"kernels_tiny_hb{suffix}").is_file()
    saved = KernelsResult.load(tmp_path / "kernels_tiny_hb.npz")
    assert saved.panels(0).shape[0] == 2 and saved.layers[0]["position"] == [0, 3]
    figure_meta = json.loads((tmp_path / "kernels_tiny_hb.figure.json").read_text())
    assert figure_meta["options"]["reduction"] == "top-k" and figure_meta["model"]["weights_sha256"]
    assert saved.orientation == figure_meta["options"]["orientation"] == "response"

    bad = runner.invoke(app, ["kernels", "--model", tiny_config("tiny_hpx"), "--weights", "random",
                              "--normalise", "zscore", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "Invalid value for '--normalise'" in bad.output and "'zscore'" in bad.output
    bad = runner.invoke(app, ["kernels", "--model", tiny_config("tiny_hpx"), "--weights", "random",
                              "--orientation", "flipped", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "kernel" in bad.output and "response" in bad.output


@pytest.mark.parametrize("text", ["S1B1", "1.1", "s1 b1", "stages.0.blocks.0"])
def test_cli_layers_are_numbered_from_one_as_in_the_paper(tmp_path, tiny_config, tiny_weights, text):
    """``--layers S1B1`` and ``--layers 1.1`` pick the first block of the first stage (before, the 0-based
    ``0.0`` did and ``1.1`` meant S2 B2); module paths stay numbered from 0, like the modules."""
    args = ["kernels", "--model", tiny_config("tiny_hb"), "--weights", tiny_weights("tiny_hb"), "--input-size", "64",
            "--out", str(tmp_path)]
    outcome = CliRunner().invoke(app, args + ["--layers", text])
    assert outcome.exit_code == 0, outcome.output
    saved = KernelsResult.load(tmp_path / "kernels_tiny_hb.npz")
    assert [(layer["name"], layer["path"]) for layer in saved.layers] == [("S1 B1", "stages.0.blocks.0.token_mixer")]
    assert saved.meta["options"]["layers"] == ["S1 B1"]


def test_cli_bad_layers_say_what_exists(tmp_path, tiny_config, tiny_weights):
    args = ["kernels", "--model", tiny_config("tiny_c_hpx"), "--weights", tiny_weights("tiny_c_hpx"),
            "--input-size", "64", "--out", str(tmp_path), "--layers"]
    for text, message in (("0.0", "numbered from 1"), ("S5", "stage 5 does not exist; the model has stages 1-4"),
                          ("S1B1", "S1 B1 has no long filter (its mixer is local_conv); layers with one are in "
                                   "stages 3-4"), ("S3B2", "block 2 of stage 3 does not exist"),
                          ("S3x", "write S3, S3B2")):
        outcome = CliRunner().invoke(app, args + [text])
        assert isinstance(outcome.exception, HpxError) and message in str(outcome.exception), (text, outcome.output)


def test_large_kernel_panels_are_the_effective_kernel_a_forward_pass_gives():
    """Known answer on a tiny SLaK (random weights): the panel of S1 B1, channel 0, is its effective kernel, a cross
    (13 x 13, strips 3 wide); the ``response`` panel holds the weight of input p + e at cell 6 + e, which an impulse
    through the module's branches shows at output p (minus the effective bias)."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("slak_tiny", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=(13, 11, 9, 5),
                              small_kernel=3, num_classes=4).eval()
    module = model.stages[0][0].large_kernel
    weight, bias = module.effective_kernel()
    views = {orientation: compute_kernels(model, layers=[(0, 0)], reduction=0, normalisation="none", input_size=64,
                                          orientation=orientation) for orientation in ("kernel", "response")}
    assert views["kernel"].layers[0]["kind"] == "large_conv"
    response = views["response"].panels(0)[0]
    np.testing.assert_allclose(views["kernel"].panels(0)[0], response[::-1, ::-1], rtol=0, atol=0)
    np.testing.assert_allclose(response, weight[0, 0].detach().double().numpy(), rtol=1e-6, atol=1e-7)
    cross = np.zeros((13, 13), dtype=bool)
    cross[5:8, :] = cross[:, 5:8] = True
    assert np.all(response[~cross] == 0) and np.all(response[cross] != 0)
    impulses = torch.zeros(13 * 13, module.channels, 16, 16)
    for index in range(13 * 13):                      # input pixel q = p + e, p = (8, 8), e in [-6, 6]^2
        impulses[index, :, 2 + index // 13, 2 + index % 13] = 1
    with torch.no_grad():
        shown = (module(impulses)[:, 0, 8, 8] - bias[0]).reshape(13, 13)
    np.testing.assert_allclose(response, shown.double().numpy(), atol=1e-6)


def test_damaged_weights_are_refused_not_drawn_blank(tiny_config) -> None:
    """A NaN in a filter's weights would draw blank kernels and zero extents: one line names the layer instead."""
    from hpx_analysis.models.zoo import load_model

    model = load_model(tiny_config("tiny_hpx"), "random", seed=0)
    with torch.no_grad():
        long_filter_layers(model)[1].long_filter.shift.fill_(float("nan"))
    with pytest.raises(HpxError, match="kernel of layer stages.1.blocks.0.token_mixer holds NaN"):
        compute_kernels(model)
