"""Native CPU kernels (hpx_analysis.models.native) against the PyTorch paths they replace, their build and fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hpx_analysis.models.frozen as frozen
from hpx_analysis.engine import environment
from hpx_analysis.models import long_filters, native
from hpx_analysis.models.long_filters import fft_shape_for, kernel_fft

from .conftest import ONE_THREAD

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def _channels_last(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last)


def _close(actual: torch.Tensor, expected: torch.Tensor, relative: float = 2e-6) -> None:
    """Equal to float32 rounding: within ``relative`` of the expected tensor's largest magnitude."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=relative * float(expected.abs().max()))


@pytest.mark.parametrize("batch,channels,size,kernel_size,centre,fft_shape", [
    (2, 20, (13, 17), (5, 5), (2, 4), None),      # a 16-channel block and a tail of 4; 5-smooth FFT sizes
    (1, 64, (32, 32), (17, 17), (8, 8), None),    # four full blocks
    (1, 3, (7, 9), (4, 3), (3, 0), None),         # one partial block, odd rows, one-sided kernel
    (3, 17, (9, 6), (5, 7), (2, 3), (14, 22)),    # FFT sizes with factors 7 and 11 (the generic radix)
])
@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_fft_filter_gives_the_values_of_pytorchs_ffts(batch, channels, size, kernel_size, centre, fft_shape, adjoint,
                                                     with_skip) -> None:
    """The native filtering (convolution, or its adjoint with the conjugate spectrum and the roles of place and read
    swapped; optionally plus the skip gain) equals PyTorch's FFT filtering of the same signal to float32 rounding,
    channels-last in and out."""
    signal = _channels_last(batch, channels, *size, seed=channels)
    kernel = torch.randn(channels, *kernel_size, generator=torch.Generator().manual_seed(1))
    fft_shape = fft_shape or fft_shape_for(size, kernel_size, centre)
    spectrum = kernel_fft(kernel, fft_shape)
    skip = torch.randn(1, channels, 1, 1, generator=torch.Generator().manual_seed(2)) if with_skip else None
    place, read = (centre, (0, 0)) if adjoint else ((0, 0), centre)
    assert native.filters(signal, spectrum, fft_shape)
    out = native.fft_filter(signal, spectrum, fft_shape, place, read, adjoint, skip)
    expected = long_filters._filter_in_fft_by_torch(signal, spectrum.conj() if adjoint else spectrum, fft_shape,
                                                    place, read)
    if skip is not None:
        expected = expected + signal * skip
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, expected)


def test_fft_filtering_takes_the_native_path_only_where_it_applies(monkeypatch) -> None:
    """Without a gradient a channels-last float32 CPU signal is filtered natively; an NCHW signal, a signal that needs
    its gradient, float64, 1D and ``HPX_NATIVE=0`` keep PyTorch's FFTs (the native function is not called)."""
    calls: list = []
    original = long_filters.native_fft_filter
    monkeypatch.setattr(long_filters, "native_fft_filter", lambda *args: calls.append(1) or original(*args))
    kernel = torch.randn(4, 5, 5)
    signal = _channels_last(1, 4, 8, 8, seed=0)
    long_filters.fft_conv_same(signal, kernel, (2, 2))
    assert len(calls) == 1
    long_filters.fft_conv_same(signal.contiguous(), kernel, (2, 2))
    long_filters.fft_conv_same(signal.clone().requires_grad_(True), kernel, (2, 2))
    long_filters.fft_conv_same(signal.double(), kernel.double(), (2, 2))
    long_filters.fft_conv_same(torch.randn(1, 4, 16), torch.randn(4, 5), (2,))
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    long_filters.fft_conv_same(signal, kernel, (2, 2))
    assert len(calls) == 1


def test_spectrum_lanes_are_kept_and_follow_in_place_edits() -> None:
    """The spectrum's native layout is computed once per spectrum and again after an in-place edit of it (its
    version moves), so an edited spectrum never filters with the old values."""
    signal = _channels_last(1, 5, 6, 6, seed=3)
    spectrum = kernel_fft(torch.randn(5, 3, 3), (8, 8))
    first = native.spectrum_lanes(spectrum)
    assert native.spectrum_lanes(spectrum) is first
    spectrum.mul_(2)
    assert native.spectrum_lanes(spectrum) is not first
    _close(native.fft_filter(signal, spectrum, (8, 8), (0, 0), (1, 1), False, None),
           long_filters._filter_in_fft_by_torch(signal, spectrum, (8, 8), (0, 0), (1, 1)))
    with pytest.raises(ValueError, match="conjugate view"):
        native.spectrum_lanes(spectrum.conj())


def test_star_relu_forward_and_backward() -> None:
    """FrozenStarReLU on a native-eligible tensor gives timm's StarReLU values and input gradient; an NCHW and a
    channels-last tensor alike."""
    scale, bias = torch.tensor([0.8]), torch.tensor([-0.3])
    for x in (torch.randn(2, 24, 5, 7), _channels_last(2, 24, 5, 7, seed=4)):
        grad = torch.randn(x.shape)
        assert native.dense_float(x)
        tracked = x.clone().requires_grad_(True)
        out = frozen.FrozenStarReLU.apply(tracked, scale, bias)
        out.backward(grad)
        reference = x.clone().requires_grad_(True)
        expected = scale * torch.relu(reference) ** 2 + bias
        expected.backward(grad)
        _close(out.detach(), expected.detach())
        _close(tracked.grad, reference.grad)
        assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
            memory_format=torch.channels_last)


def test_native_gating_gives_the_fused_gatings_values_and_input_gradient() -> None:
    """NativeHyenaPixelGating against FrozenHyenaPixelGating (PyTorch) on the same channels-last qkv: output and
    input gradient to float32 rounding, 40 channels (two blocks and a half)."""
    channels, size, kernel_size, centre = 40, (11, 13), (9, 9), (4, 4)
    qkv = _channels_last(2, 3 * channels, *size, seed=5)
    weights = [torch.rand(channels, generator=torch.Generator().manual_seed(s)) + 0.5 for s in (6, 7)]
    fft_shape = fft_shape_for(size, kernel_size, centre)
    spectrum = kernel_fft(0.1 * torch.randn(channels, *kernel_size), fft_shape)
    skip = torch.randn(1, channels, 1, 1)
    grad = _channels_last(2, channels, *size, seed=8)
    results = []
    for gating in (frozen.FrozenHyenaPixelGating, frozen.NativeHyenaPixelGating):
        x = qkv.clone().requires_grad_(True)
        out = gating.apply(x, *weights, 1e-5, spectrum, skip, fft_shape, centre)
        out.backward(grad)
        results.append((out.detach(), x.grad))
    assert native.gates(qkv, *weights)
    _close(results[1][0], results[0][0], 1e-5)
    _close(results[1][1], results[0][1], 1e-5)
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Every kernel splits independent tasks (images and channel blocks, pixels, elements) over the threads: one
    thread and two give the same bits."""
    signal = _channels_last(2, 40, 12, 12, seed=9)
    spectrum = kernel_fft(torch.randn(40, 5, 5), (16, 16))
    weight = torch.rand(40) + 0.5
    grad = _channels_last(2, 40, 12, 12, seed=10)
    previous = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            qkv = torch.cat([signal] * 3, 1).contiguous(memory_format=torch.channels_last)
            normed, statistics = native.gate_in(qkv, weight, 1e-5)
            grad_qkv = torch.zeros_like(qkv)
            native.gate_in_backward(grad, qkv, statistics, weight, grad_qkv)
            outputs.append([native.fft_filter(signal, spectrum, (16, 16), (0, 0), (2, 2), False, None),
                            native.star_relu(signal, 0.7, 0.1), normed, grad_qkv])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*outputs):
        assert torch.equal(one, two)


def test_build_is_cached_per_source(tmp_path, monkeypatch) -> None:
    """The library is compiled into HPX_NATIVE_DIR once: a second build returns the same file untouched; a changed
    source gets a library of its own."""
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path))
    native._build_identity.cache_clear()
    try:
        built = native.build()
        stamp = built.stat().st_mtime_ns
        assert built.parent == tmp_path and native.build() == built and built.stat().st_mtime_ns == stamp
        changed = tmp_path / "native.c"
        changed.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
        monkeypatch.setattr(native, "SOURCE", changed)
        native._build_identity.cache_clear()
        assert native.build() != built
    finally:
        native._build_identity.cache_clear()


def test_without_a_compiler_everything_keeps_its_pytorch_path(tmp_path, monkeypatch) -> None:
    """No compiler (or HPX_NATIVE=0): one warning, no library, the run key says so, and filtering still gives the
    right values through PyTorch's FFTs."""
    model = torch.nn.Conv2d(1, 1, 1)
    on = environment(model)["native kernels"]
    monkeypatch.setenv("CC", "no-such-compiler-hpx")
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path))
    for cached in (native._build_identity, native._loaded):
        cached.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="without its native CPU kernels.*no C compiler"):
            assert native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None  # warned once
        assert environment(model)["native kernels"] == "off" != on
        signal = _channels_last(1, 4, 8, 8, seed=11)
        kernel = torch.randn(4, 3, 3)
        torch.testing.assert_close(long_filters.fft_conv_same(signal, kernel, (1, 1)),
                                   long_filters.fft_conv_same(signal.contiguous(), kernel, (1, 1)))
    finally:
        for cached in (native._build_identity, native._loaded):
            cached.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.library() is None and environment(model)["native kernels"] == "off"
    assert "native kernels" not in environment(torch.nn.Conv2d(1, 1, 1, device="meta"))  # off the CPU: never used


def test_the_native_kernels_benchmark_runs_and_the_outputs_agree() -> None:
    """``benchmarks/native_kernels.py --quick`` (the README's per-kernel numbers) runs every case at two small stages
    and its native and PyTorch outputs agree."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "native_kernels.py"
    run = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=ONE_THREAD,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    cases = [line.split("^2")[1].split(" native ")[0].strip() for line in run.stdout.splitlines() if "^2" in line]
    assert cases == ["filter", "filter adjoint", "gating f+b", "StarReLU f+b"] * 2, run.stdout
    assert "OK at 1e-5" in run.stdout
