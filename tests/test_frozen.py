"""Fused functions for frozen modules (hpx_analysis.models.frozen) against the modules' own autograd graphs."""

from __future__ import annotations

import pytest
import torch

import hpx_analysis.models.frozen as frozen
from hpx_analysis.models import native
from hpx_analysis.models.long_filters import apply_kernel_fft, apply_kernel_fft_adjoint, fft_shape_for, kernel_fft
from hpx_analysis.models.mixers import HyenaPixelMixer


def _frozen_mixer(use_layernorm: bool, seed: int = 0) -> HyenaPixelMixer:
    """A small HyenaPixel mixer (8 channels, 9x9 long kernel) in eval mode with frozen, non-trivial parameters."""
    torch.manual_seed(seed)
    mixer = HyenaPixelMixer(8, long_kernel_size=9, filter_emb_dim=4, use_layernorm=use_layernorm).eval()
    with torch.no_grad():
        for name, parameter in mixer.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(0.5 + torch.rand_like(parameter))
    return mixer.requires_grad_(False)


def _output_and_input_gradient(mixer: HyenaPixelMixer, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = mixer(x)
    return out.detach(), torch.autograd.grad(out, x, grad)[0]


def _count_calls(monkeypatch, function: type) -> list:
    calls: list = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.mark.parametrize("use_layernorm", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("native_kernels", ["1", "0"])
def test_fused_gating_gives_the_mixers_values_and_input_gradients(use_layernorm, channels_last, native_kernels,
                                                                 monkeypatch) -> None:
    """Fused (PyTorch, or the native kernels where they apply: channels-last with both norms) against the mixer's own
    graph."""
    monkeypatch.setenv(native.NATIVE_ENV, native_kernels)
    mixer = _frozen_mixer(use_layernorm)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 12, 10, generator=generator)
    grad = torch.randn(2, 8, 12, 10, generator=generator)
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    expected, expected_grad = _output_and_input_gradient(mixer, x, grad)
    by_native = native_kernels == "1" and channels_last and use_layernorm and native.library() is not None
    calls = _count_calls(monkeypatch, frozen.NativeHyenaPixelGating if by_native else frozen.FrozenHyenaPixelGating)
    with frozen.fused_frozen(mixer):
        out, out_grad = _output_and_input_gradient(mixer, x, grad)
    assert len(calls) == 1 and "forward" not in vars(mixer)  # fused inside, the class's forward again after
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(out_grad, expected_grad, rtol=1e-5, atol=1e-6 * float(expected_grad.abs().max()))
    assert out_grad.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_gating_keeps_its_own_forward_where_fusing_would_change_what_is_computed(monkeypatch) -> None:
    """A hook on the long filter, a parameter that needs its gradient, autocast and a kernel that needs its gradient
    each keep the mixer's own graph (the hook fires; the parameter and kernel get gradients)."""
    x = torch.randn(1, 8, 12, 12)
    calls = _count_calls(monkeypatch, frozen.FrozenHyenaPixelGating)

    hooked = _frozen_mixer(True)
    seen = []
    hooked.long_conv.register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    with frozen.fused_frozen(hooked):
        hooked(x)
    assert seen == [torch.Size([1, 8, 12, 12])]

    trainable = _frozen_mixer(True)
    trainable.long_conv.bias.requires_grad_(True)
    with frozen.fused_frozen(trainable):
        trainable(x).sum().backward()
    assert trainable.long_conv.bias.grad is not None

    with frozen.fused_frozen(fused := _frozen_mixer(True)), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(x).dtype == torch.bfloat16

    edited = _frozen_mixer(True)
    kernel = edited.long_conv.kernel().detach().requires_grad_(True)
    with frozen.fused_frozen(edited), edited.long_conv.override_kernel(kernel):
        edited(x).sum().backward()
    assert kernel.grad is not None and kernel.grad.abs().sum() > 0
    assert calls == []


@pytest.mark.parametrize("sizes, kernel_size, centre", [((17, 23), (7, 9), (3, 4)), ((17, 23), (7, 9), (0, 8)),
                                                         ((9, 9), (17, 17), (16, 0)), ((31,), (61,), (30,)),
                                                         ((31,), (5,), (4,))])
def test_fft_adjoint_is_the_transpose_of_the_convolution(sizes, kernel_size, centre) -> None:
    """<conv(x), g> = <x, adjoint(g)> for centred, corner and one-sided kernels larger and smaller than the signal, and
    the adjoint equals autograd's input gradient of the convolution."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *sizes, generator=generator, requires_grad=True)
    grad = torch.randn(2, 3, *sizes, generator=generator)
    fft_shape = fft_shape_for(sizes, kernel_size, centre)
    kernel_f = kernel_fft(torch.randn(3, *kernel_size, generator=generator), fft_shape)
    out = apply_kernel_fft(x, kernel_f, fft_shape, centre)
    adjoint = apply_kernel_fft_adjoint(grad, kernel_f, fft_shape, centre)
    lhs, rhs = (out.detach().double() * grad).sum(), (x.detach().double() * adjoint).sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * float((out.detach().double() * grad).abs().sum())
    torch.testing.assert_close(adjoint, torch.autograd.grad(out, x, grad)[0], rtol=1e-5, atol=1e-5)
