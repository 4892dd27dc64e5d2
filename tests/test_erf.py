"""ERF analyzer: known answers on linear toy models, metrics on constructed maps, resume, CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from torch import nn
from typer.testing import CliRunner

from hpx_analysis.analyzers.erf import (ERFResult, area_ratios, display_map, effective_receptive_field,
                                        gaussian_fit, radial_mass, resolve_output_layer)
from hpx_analysis.errors import HpxError
from hpx_analysis.inspection import kernel
from hpx_analysis.models.long_filters import HyenaPixelFilter
from hpx_analysis.models.zoo import load_model
from hpx_analysis_cli.app import app


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


def test_area_ratios_of_uniform_maps() -> None:
    ratios = area_ratios(np.ones((65, 65)))
    # smallest odd side s with s^2 > t * 65^2
    for t, side in ((0.2, 31), (0.3, 37), (0.5, 47), (0.99, 65)):
        assert ratios[f"{t:g}"] == pytest.approx(side * side / 65 ** 2)
    even = area_ratios(np.ones((64, 64)))
    assert even["0.99"] is None  # the largest centred square (63 px) holds only 96.9%
    assert even["0.5"] == pytest.approx(47 * 47 / 64 ** 2)
    assert all(value is None for value in area_ratios(np.zeros((9, 9))).values())


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


def test_output_layer_resolution(tiny_config, tiny_weights) -> None:
    model = load_model(tiny_config("tiny_hb"), tiny_weights("tiny_hb"))
    assert resolve_output_layer(model, None) == "stages.3"
    assert resolve_output_layer(model, "2") == "stages.1"
    assert resolve_output_layer(model, "stages.2.blocks.0") == "stages.2.blocks.0"
    for bad in ("7", "stages.9"):
        with pytest.raises(HpxError):
            resolve_output_layer(model, bad)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path) -> None:
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
        effective_receptive_field(model, inputs, layer="", batch_size=2, resume_dir=tmp_path, save_every=1,
                                  progress=False)
    assert len(list(tmp_path.glob(".erf_partial_*.npz"))) == 1
    calls["count"] = 10  # count the resumed run's passes without interrupting
    resumed = effective_receptive_field(model, inputs, layer="", batch_size=2, resume_dir=tmp_path,
                                        save_every=1, progress=False)
    handle.remove()
    assert calls["count"] == 11  # only the last batch (image 5) was computed
    np.testing.assert_array_equal(resumed.arrays["maps"], reference.arrays["maps"])
    assert resumed.arrays["used"][0] == 5
    assert not list(tmp_path.glob(".erf_partial_*"))


def test_cli_writes_figure_and_result_and_replots(tmp_path, tiny_config, tiny_weights) -> None:
    runner = CliRunner()
    args = ["erf", "-m", tiny_config("tiny_hpx"), "-m", tiny_config("tiny_hpx_sc"), "-w", "random",
            "--size", "64", "--num-images", "2", "--batch-size", "2", "--device", "cpu", "-o", str(tmp_path)]
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

    png = stem.with_suffix(".png")
    png.unlink()
    replot = runner.invoke(app, ["erf", "--replot", str(stem.with_suffix(".npz")), "--shared-scale"])
    assert replot.exit_code == 0, replot.output
    assert png.is_file()


def test_cli_kim_convention_and_bad_input(tmp_path, tiny_config, tiny_weights) -> None:
    runner = CliRunner()
    base = ["erf", "-m", tiny_config("tiny_hb"), "-w", tiny_weights("tiny_hb"), "--size", "64", "--num-images", "1",
            "--device", "cpu", "-o", str(tmp_path)]
    outcome = runner.invoke(app, base + ["--convention", "kim2023", "--layer", "3"])
    assert outcome.exit_code == 0, outcome.output
    meta = json.loads((tmp_path / "erf_tiny_hb.json").read_text())
    assert meta["convention"] == "kim2023" and meta["models"][0]["layer"] == "stages.2"
    assert set(meta["models"][0]["gaussian"]) == {"x0", "y0", "sigma_x", "sigma_y", "r2"}
    bad = runner.invoke(app, base + ["--convention", "gaussian"])
    assert isinstance(bad.exception, HpxError) and "convention" in str(bad.exception)


def test_bf16_autocast_approximates_float32(tiny_config, tiny_weights) -> None:
    model = load_model(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    inputs = torch.randn(2, 3, 64, 64)
    exact = effective_receptive_field(model, inputs, progress=False).arrays["maps"][0]
    low = effective_receptive_field(model, inputs, amp="bf16", progress=False).arrays["maps"][0]
    assert np.isfinite(low).all()
    assert np.corrcoef(exact.ravel(), low.ravel())[0, 1] > 0.95
    with pytest.raises(HpxError):
        effective_receptive_field(model, inputs, amp="int8", progress=False)
