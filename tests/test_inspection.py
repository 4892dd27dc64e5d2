"""Inspection API: enumeration, kernel modification context, and the eval-mode kernel FFT cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpx_analysis import inspection, interventions
from hpx_analysis.errors import HpxError
from hpx_analysis.layer_names import LayerRef
from hpx_analysis.models.long_filters import HyenaPixelFilter
from hpx_analysis.models.zoo import load_model

from .conftest import TINY


@pytest.fixture
def tiny_hpx(tiny_weights):
    return load_model(str(TINY / "tiny_hpx.json"), tiny_weights("tiny_hpx"))


@pytest.fixture
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_mixers_in_order_with_feature_sizes(tiny_hpx):
    infos = inspection.list_mixers(tiny_hpx, (64, 96))
    assert [(i.stage, i.block, i.kind) for i in infos] == [(s, 0, HyenaPixelFilter.kind) for s in range(4)]
    assert [i.feature_size for i in infos] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [i.kernel_size for i in infos] == [(31, 31), (15, 15), (7, 7), (3, 3)]
    assert infos[2].path == "stages.2.blocks.0.token_mixer" and infos[2].name == "S3 B1"


def test_window_parameters_reproduce_window(tiny_hpx):
    info = inspection.long_filter_layers(tiny_hpx)[1]
    params = inspection.window_parameters(info)
    expected = torch.exp(-params["delta"][:, None, None] * params["distance"]) + params["shift"][:, None, None]
    torch.testing.assert_close(inspection.window(info), expected)


@torch.no_grad()
def test_modify_kernels_applies_and_restores_exactly(tiny_hpx, image):
    before = tiny_hpx(image)
    with interventions.modify_kernels(tiny_hpx, lambda k, info: k, layers=None):
        identical = tiny_hpx(image)
    with interventions.modify_kernels(tiny_hpx, lambda k, info: torch.zeros_like(k), layers=["S1 B1"]) as chosen:
        assert [info.name for info in chosen] == ["S1 B1"]
        zeroed = tiny_hpx(image)
        assert torch.count_nonzero(inspection.kernel(chosen[0])) == 0
    after = tiny_hpx(image)
    assert torch.equal(identical, before)
    assert not torch.allclose(zeroed, before, atol=1e-4)
    assert torch.equal(after, before)


@torch.no_grad()
def test_zero_kernel_leaves_only_the_skip_term(tiny_hpx):
    filt = inspection.long_filter_layers(tiny_hpx)[0].long_filter
    u = torch.randn(1, 32, 16, 16)
    with interventions.modify_kernels(tiny_hpx, lambda k, info: torch.zeros_like(k), layers=[0]):
        torch.testing.assert_close(filt(u), u * filt.bias)


def test_unknown_layer_selection_is_an_error(tiny_hpx):
    with pytest.raises(HpxError, match="stage 9 does not exist; the model has stages 1-4"):
        with interventions.modify_kernels(tiny_hpx, lambda k, info: k, layers=["S9 B9"]):
            pass


@pytest.mark.parametrize("text, one_based, expected", [
    ("S3", True, LayerRef(2)), ("s3", True, LayerRef(2)), ("S3B2", True, LayerRef(2, 1)),
    ("S3 B2", True, LayerRef(2, 1)), (" s3b2 ", True, LayerRef(2, 1)), ("3", True, LayerRef(2)),
    ("3.2", True, LayerRef(2, 1)), ("stages.2", True, LayerRef(2)), ("stages.2.blocks.1", True, LayerRef(2, 1)),
    # the Python API numbers from 0; the paper's labels and module paths mean the same in both
    ("3", False, LayerRef(3)), ("3.2", False, LayerRef(3, 2)), ("0.0", False, LayerRef(0, 0)),
    ("S3 B2", False, LayerRef(2, 1)), ("stages.2.blocks.1", False, LayerRef(2, 1)),
])
def test_layer_ref_parse_table(text, one_based, expected):
    assert LayerRef.parse(text, one_based) == expected


@pytest.mark.parametrize("text", ["", "S", "S0", "S3B0", "0", "1.0", "3.", "3.2.1", "B2", "S3 B2 C1", "-1",
                                  "stages.2.blocks", "stages.2.blocks.1.token_mixer", "layer3", "S3,S4"])
def test_malformed_layer_text_is_an_error(text):
    with pytest.raises(HpxError, match="layer '"):
        LayerRef.parse(text)


def test_layer_ref_labels_and_api_forms():
    assert str(LayerRef(2, 1)) == "S3 B2" and str(LayerRef(0)) == "S1"
    assert LayerRef.parse(str(LayerRef(2, 1))) == LayerRef.parse(str(LayerRef(2, 1)), one_based=False)
    assert [LayerRef.of(x) for x in (LayerRef(1), 1, (1, 0), "1.0", "S2")] == [
        LayerRef(1), LayerRef(1), LayerRef(1, 0), LayerRef(1, 0), LayerRef(1)]
    with pytest.raises(HpxError, match="start at 0"):
        LayerRef(-1)


def test_layer_selection_and_module_paths(tiny_hpx, tiny_weights):
    infos = inspection.list_mixers(tiny_hpx)
    assert [info.name for info in inspection.select_mixers(infos, [3, (0, 0), "S2", LayerRef(0)])] == [
        "S4 B1", "S1 B1", "S2 B1"]                                   # in the given order, without repeats
    assert [info.name for info in inspection.select_mixers(infos, "S2")] == ["S2 B1"]
    assert [info.name for info in inspection.select_mixers(infos, [np.int64(2)])] == ["S3 B1"]
    assert inspection.layer_module(tiny_hpx, LayerRef(1)) == "stages.1"
    assert inspection.layer_module(tiny_hpx, (1, 0)) == "stages.1.blocks.0"
    with pytest.raises(HpxError, match="block 2 of stage 2 does not exist; stage 2 has blocks 1$"):
        inspection.layer_module(tiny_hpx, LayerRef(1, 1))
    c_hpx = load_model(str(TINY / "tiny_c_hpx.json"), tiny_weights("tiny_c_hpx"))
    with pytest.raises(HpxError, match="S1 has no long filter .*in stages 3-4"):
        with interventions.modify_kernels(c_hpx, lambda k, info: k, layers=[0]):
            pass


@torch.no_grad()
def test_cut_short_convs_keeps_the_centre_tap_and_restores_exactly(tiny_hpx, image):
    """Inside: the chosen stages' 5x5 depthwise kernels are zero but for the centre tap, so the conv is a
    per-channel scaling plus bias; the other stages are untouched. After exit (also after an exception)
    the state dict and the logits are bit-identical."""
    before = {key: value.clone() for key, value in tiny_hpx.state_dict().items()}
    logits = tiny_hpx(image)
    mixers = inspection.list_mixers(tiny_hpx)
    with interventions.cut_short_convs(tiny_hpx, [1, 3]) as cut:
        assert [info.stage for info in cut] == [1, 3]
        for info in mixers:
            conv = info.module.depthwise_conv
            original = before[f"{info.path}.depthwise_conv.weight"]  # (C, 1, 5, 5)
            if info.stage in (1, 3):
                expected = torch.zeros_like(original)
                expected[..., 2, 2] = original[..., 2, 2]
                assert torch.equal(conv.weight, expected)
                u = torch.randn(1, conv.in_channels, 6, 6)
                scaled = u * original[:, 0, 2, 2, None, None] + conv.bias[:, None, None]
                torch.testing.assert_close(conv(u), scaled)
            else:
                assert torch.equal(conv.weight, original)
        assert not torch.allclose(tiny_hpx(image), logits, atol=1e-4)
    assert all(torch.equal(value, tiny_hpx.state_dict()[key]) for key, value in before.items())
    assert torch.equal(tiny_hpx(image), logits)
    with pytest.raises(RuntimeError, match="inside"):
        with interventions.cut_short_convs(tiny_hpx, [0]):
            raise RuntimeError("inside")
    assert all(torch.equal(value, tiny_hpx.state_dict()[key]) for key, value in before.items())
    with pytest.raises(HpxError, match=r"stage\(s\) 5"):
        with interventions.cut_short_convs(tiny_hpx, [0, 4]):
            pass


@torch.no_grad()
def test_kernel_fft_cache_reused_and_invalidated(tiny_hpx, image, tiny_weights):
    filt = inspection.long_filter_layers(tiny_hpx)[0].long_filter
    first = tiny_hpx(image)
    assert len(filt.fft_cache) == 1
    calls = []
    original = type(filt).base_kernel
    filt.base_kernel = lambda: calls.append(1) or original(filt)
    second = tiny_hpx(image)
    assert calls == [] and torch.equal(first, second)  # served from the cache
    filt.shift.add_(0.5)  # in-place weight edit: the next forward recomputes
    edited = tiny_hpx(image)
    assert calls == [1] and not torch.allclose(edited, first)
    tiny_hpx.load_state_dict(load_model(str(TINY / "tiny_hpx.json"), tiny_weights("tiny_hpx")).state_dict())
    torch.testing.assert_close(tiny_hpx(image), first, atol=0, rtol=0)
    tiny_hpx(torch.randn(1, 3, 96, 96))  # another resolution: another FFT size
    assert len(filt.fft_cache) == 2


@torch.no_grad()
def test_kernel_fft_cache_sees_edits_that_keep_tensor_versions(tiny_hpx, image):
    """An edit through ``.data`` leaves a tensor's version alone, and a kernel modifier's closure is no tensor of the
    filter: the cache compares values, so both give the outputs of a model built with the edit."""
    filters = [info.long_filter for info in inspection.long_filter_layers(tiny_hpx)]
    first = tiny_hpx(image)
    for filt in filters:
        filt.shift.data.add_(0.5)  # no version bump
    edited = tiny_hpx(image)
    for filt in filters:
        filt.use_cache = False
    assert not torch.allclose(edited, first) and torch.equal(edited, tiny_hpx(image))
    for filt in filters:
        filt.use_cache = True
    gain = torch.ones(1)
    with interventions.modify_kernels(tiny_hpx, lambda kernel, info: kernel * gain):
        unit = tiny_hpx(image)
        gain.fill_(3.0)
        tripled = tiny_hpx(image)
    with interventions.modify_kernels(tiny_hpx, lambda kernel, info: kernel * 3.0):
        truth = tiny_hpx(image)
    assert torch.equal(unit, edited) and torch.equal(tripled, truth) and not torch.allclose(tripled, unit)
    with interventions.modify_kernels(tiny_hpx, lambda kernel, info: kernel.mul_(3.0)):  # edits its input
        assert torch.equal(tiny_hpx(image), truth) and torch.equal(tiny_hpx(image), truth)


@torch.no_grad()
def test_kernel_fft_cache_is_the_same_with_and_without_autocast(tiny_hpx):
    """A spectrum cached under bf16 autocast must not serve a float32 pass (nor the reverse): the kernel is
    computed in float32 either way."""
    filt = inspection.long_filter_layers(tiny_hpx)[0].long_filter
    sizes, device = (16, 16), torch.device("cpu")
    filt.use_cache = False
    plain, _ = filt.spectrum(sizes, device)
    filt.use_cache = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = filt.spectrum(sizes, device)
    torch.testing.assert_close(under_autocast, plain, atol=0, rtol=0)
    assert torch.equal(filt.spectrum(sizes, device)[0], plain)


def test_no_cache_when_kernel_needs_gradients(tiny_hpx, image):
    filt = inspection.long_filter_layers(tiny_hpx)[0].long_filter
    tiny_hpx.train()
    tiny_hpx(image).sum().backward()
    assert len(filt.fft_cache) == 0 and filt.deltas.grad is not None
    tiny_hpx.eval()
    tiny_hpx.zero_grad()
    tiny_hpx(image).sum().backward()  # eval with trainable params: still differentiable w.r.t. the filter
    assert filt.implicit_filter[0].weight.grad.abs().sum() > 0


def test_frozen_parameters_cache_and_keep_input_gradients(tiny_hpx, image):
    for param in tiny_hpx.parameters():
        param.requires_grad_(False)
    cached_input = image.clone().requires_grad_(True)
    tiny_hpx(cached_input).sum().backward()
    filt = inspection.long_filter_layers(tiny_hpx)[0].long_filter
    assert len(filt.fft_cache) == 1
    for f in (i.long_filter for i in inspection.long_filter_layers(tiny_hpx)):
        f.use_cache = False
    uncached_input = image.clone().requires_grad_(True)
    tiny_hpx(uncached_input).sum().backward()
    torch.testing.assert_close(cached_input.grad, uncached_input.grad, atol=1e-6, rtol=1e-5)


def test_cli_inspect_lists_the_named_layers():
    from typer.testing import CliRunner

    from hpx_analysis_cli.app import app
    table = CliRunner().invoke(app, ["inspect", "-m", str(TINY / "tiny_hpx.json"), "-w", "random", "--layers", "S2B1,3"])
    assert table.exit_code == 0, table.output
    rows = table.output.splitlines()[1:]
    assert [row.split()[:3] for row in rows] == [["S2", "B1", "hyenapixel_2d"], ["S3", "B1", "hyenapixel_2d"]]
    bad = CliRunner().invoke(app, ["inspect", "-m", str(TINY / "tiny_hpx.json"), "-w", "random", "--layers", "S5"])
    assert isinstance(bad.exception, HpxError) and "stage 5 does not exist" in str(bad.exception)


@torch.no_grad()
def test_override_kernel_applies_its_kernel_then_restores_the_cache(tiny_hpx, image):
    """Inside: the filter is a direct (flipped-kernel) depthwise convolution with the given kernel plus the
    skip term; nested blocks and in-place edits of the kernel are honoured. After exit, also after an
    exception: the learned kernel's cached FFT serves again unchanged, and a weight edit still invalidates it."""
    filt = inspection.long_filter_layers(tiny_hpx)[0].long_filter  # kernel (32, 31, 31), centre (15, 15)
    u = torch.randn(2, filt.channels, 16, 16, generator=torch.Generator().manual_seed(1))
    logits, untouched = tiny_hpx(image), filt(u)

    def direct(k: torch.Tensor) -> torch.Tensor:
        return F.conv2d(u, k.flip(-2, -1)[:, None], padding=filt.centre, groups=filt.channels) + u * filt.bias

    calls = []
    original = type(filt).base_kernel
    filt.base_kernel = lambda: calls.append(1) or original(filt)
    override = torch.randn(filt.channels, *filt.kernel_size, generator=torch.Generator().manual_seed(2))
    with filt.override_kernel(override):
        torch.testing.assert_close(filt(u), direct(override), atol=1e-4, rtol=1e-4)
        assert torch.equal(inspection.kernel(filt), override)
        with filt.override_kernel(torch.zeros_like(override)):
            torch.testing.assert_close(filt(u), u * filt.bias, atol=1e-5, rtol=0)
        torch.testing.assert_close(filt(u), direct(override), atol=1e-4, rtol=1e-4)
        override.mul_(-2)  # in-place edit of the override: its FFT is recomputed
        torch.testing.assert_close(filt(u), direct(override), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="inside"):
        with filt.override_kernel(override):
            raise RuntimeError("inside")
    assert calls == []  # the learned kernel was never re-evaluated: its cache entry survived
    assert torch.equal(filt(u), untouched) and torch.equal(tiny_hpx(image), logits) and calls == []
    filt.shift.add_(0.5)  # a weight edit after the blocks invalidates as before
    torch.testing.assert_close(filt(u), direct(original(filt)), atol=1e-4, rtol=1e-4)
    assert calls == [1] and not torch.allclose(filt(u), untouched, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        with filt.override_kernel(override[:, :3]):
            pass


def test_override_kernel_keeps_gradients_to_the_kernel(tiny_hpx):
    """An override that requires grad is not cached: the output is differentiable w.r.t. it (linear in it)."""
    filt = inspection.long_filter_layers(tiny_hpx)[3].long_filter
    u = torch.randn(1, filt.channels, 2, 2)
    override = torch.zeros(filt.channels, *filt.kernel_size, requires_grad=True)
    with filt.override_kernel(override):
        filt(u)[0, :, 0, 0].sum().backward()
    # d out[c, 0, 0] / d k[c, a, b] = u[c, -(a - 1), -(b - 1)] inside the map: taps (1, 1), (0, 1), (1, 0), (0, 0)
    expected = torch.zeros_like(override)
    expected[:, 1, 1], expected[:, 0, 1], expected[:, 1, 0], expected[:, 0, 0] = (u[0, :, 0, 0], u[0, :, 1, 0],
                                                                                  u[0, :, 0, 1], u[0, :, 1, 1])
    torch.testing.assert_close(override.grad, expected, atol=1e-5, rtol=1e-5)
