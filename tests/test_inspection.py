"""Inspection API: enumeration, kernel modification context, and the eval-mode kernel FFT cache."""

from __future__ import annotations

import pytest
import torch

from hpx_analysis import inspection
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
    assert [(i.stage, i.block, i.kind) for i in infos] == [(s, 0, inspection.HYENAPIXEL_2D) for s in range(4)]
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
    with inspection.modify_kernels(tiny_hpx, lambda k, info: k, layers=None):
        identical = tiny_hpx(image)
    with inspection.modify_kernels(tiny_hpx, lambda k, info: torch.zeros_like(k), layers=["S1 B1"]) as chosen:
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
    with inspection.modify_kernels(tiny_hpx, lambda k, info: torch.zeros_like(k), layers=[0]):
        torch.testing.assert_close(filt(u), u * filt.bias)


def test_unknown_layer_selection_is_an_error(tiny_hpx):
    with pytest.raises(ValueError, match="no long-filter layer matches"):
        with inspection.modify_kernels(tiny_hpx, lambda k, info: k, layers=["S9 B9"]):
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
