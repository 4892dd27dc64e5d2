"""Fused functions for frozen modules, for passes that need input gradients only (the ERF analyzer).

With frozen parameters autograd's graph of an elementwise chain keeps more tensors and makes more passes over memory
than the gradient needs. :func:`fused_frozen` makes, for the duration of a ``with`` block,

- every timm ``StarReLU`` ``s * relu(x)**2 + b`` with frozen s, b run as :class:`FrozenStarReLU`: one saved tensor,
  4 elementwise passes against the 9 of autograd's graph;
- every :class:`.mixers.HyenaPixelMixer` with an implicit long filter and its layer norms (if any), all frozen, run
  its gating ``out_norm(v * (K * u + skip * u))``, ``u = qk_norm(q * k)``, as :class:`FrozenHyenaPixelGating`:
  the skip gain in the same pass as the filter's output, the three input gradients written into one (B, 3C, H, W)
  tensor (autograd's graph concatenates three), the filter's adjoint by its FFT directly: 2-4% less time per ERF
  pass of ``hpx_former_s18`` at 1024 px on 2 CPU cores (``docs/erf-performance.md``).

On a channels-last float32 CPU tensor both run by the native kernels (:mod:`.native`) where they are available:
StarReLU in one pass each way, the gating as one pass per pixel on each side of its filter
(:class:`NativeHyenaPixelGating`).
Values agree with the modules' own graph to float32 rounding (ERF maps of ``hpx_former_s18`` at 1024 px within
1e-5 of their maximum). A module keeps its own forward when a hook on it (StarReLU's inner ReLU; the mixer's norms
or long filter) would be skipped, when a parameter needs a gradient, and (the mixer) under autocast or with a
kernel that needs a gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.models.metaformer import StarReLU
from torch import Tensor, nn

from .long_filters import apply_kernel_fft, apply_kernel_fft_adjoint
from .mixers import HyenaPixelMixer
from .native import (dense_float, gate_in, gate_in_backward, gate_out, gate_out_backward, gates, star_relu,
                     star_relu_backward)


class FrozenStarReLU(torch.autograd.Function):
    """timm's StarReLU ``s * relu(x)**2 + b`` with frozen s, b (1,) on x of any shape: the one saved tensor is the
    slope ``2 s relu(x)``, the gradient ``grad * slope``; 4 elementwise passes over x's size against the 9 of
    autograd's graph of timm's forward (relu, pow, mul, add; mul, pow, 2 mul, threshold_backward). A dense float32
    CPU x runs native (:mod:`.native`): one pass forward (x is saved instead of the slope), one backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        ctx.native = dense_float(x) and scale.numel() == bias.numel() == 1
        if ctx.native:
            ctx.scale = float(scale)
            ctx.save_for_backward(x)
            return star_relu(x, ctx.scale, float(bias))
        rectified = torch.relu(x)
        slope = rectified * (2 * scale)
        ctx.save_for_backward(slope)
        return torch.addcmul(bias, rectified, slope, value=0.5)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        saved, = ctx.saved_tensors
        return (star_relu_backward(saved, grad, ctx.scale) if ctx.native else grad * saved), None, None


def _norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tuple[Optional[Tensor], ...]]:
    """Bias-free layer norm over the channels of x (B, C, H, W), or x itself where weight is None; and what its
    backward needs: (x, mean, 1/std) with the statistics (B, H, W, 1), or three Nones without a norm."""
    if weight is None:
        return x, (None, None, None)
    out, mean, rstd = torch.native_layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, None, eps)
    return out.permute(0, 3, 1, 2), (x, mean, rstd)


def _norm_backward(grad: Tensor, weight: Optional[Tensor], x: Optional[Tensor], mean: Optional[Tensor],
                   rstd: Optional[Tensor]) -> Tensor:
    """Input gradient (B, C, H, W) of :func:`_norm` from what it saved; grad itself without a norm."""
    if weight is None:
        return grad
    return torch.ops.aten.native_layer_norm_backward(
        grad.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), (x.shape[1],), mean, rstd, weight, None,
        [True, False, False])[0].permute(0, 3, 1, 2)


class FrozenHyenaPixelGating(torch.autograd.Function):
    """HyenaPixel's gating with frozen norms and filter: qkv (B, 3C, H, W) -> (B, C, H, W),
    ``out_norm(v * (K * u + skip * u))`` with ``u = qk_norm(q * k)``; K given by its rFFT ``kernel_f`` (C, *fft_shape
    halved), skip (1, C, 1, 1), the norms bias-free layer norms over C with weights (C,), or none where the weights
    are None. The gradient of qkv is the only one."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, qk_weight: Optional[Tensor], out_weight: Optional[Tensor], eps: float,
                kernel_f: Tensor, skip: Tensor, fft_shape: Tuple[int, ...], centre: Tuple[int, ...]) -> Tensor:
        q, k, v = qkv.chunk(3, dim=1)
        product = q * k
        normed, qk_saved = _norm(product, qk_weight, eps)
        filtered = apply_kernel_fft(normed, kernel_f, fft_shape, centre, skip=skip)
        out, out_saved = _norm(v * filtered, out_weight, eps)
        ctx.save_for_backward(qkv, filtered, kernel_f, skip, qk_weight, out_weight, *qk_saved, *out_saved)
        ctx.fft = (fft_shape, centre)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        qkv, filtered, kernel_f, skip, qk_weight, out_weight, *saved = ctx.saved_tensors
        q, k, v = qkv.chunk(3, dim=1)
        grad_qkv = torch.empty_like(qkv)
        grad_q, grad_k, grad_v = grad_qkv.chunk(3, dim=1)
        grad_gated = _norm_backward(grad, out_weight, *saved[3:])
        torch.mul(grad_gated, filtered, out=grad_v)
        grad_filtered = grad_gated * v
        grad_normed = apply_kernel_fft_adjoint(grad_filtered, kernel_f, *ctx.fft, skip=skip)
        grad_product = _norm_backward(grad_normed, qk_weight, *saved[:3])
        torch.mul(grad_product, k, out=grad_q)
        torch.mul(grad_product, q, out=grad_k)
        return grad_qkv, None, None, None, None, None, None, None


class NativeHyenaPixelGating(torch.autograd.Function):
    """:class:`FrozenHyenaPixelGating` by the native kernels (:mod:`.native`), for a channels-last float32 CPU qkv
    (B, 3C, H, W) with both layer norms: each side of the filter is one pass per pixel over its channels (the
    product, the norm and its statistics together; backward the product again, the norm's gradient and both input
    gradients), the filter and its adjoint with the skip gain in their output pass. Saves qkv, the filter's output and
    the norms' statistics (less than the unfused gating's norm inputs)."""

    @staticmethod
    def forward(ctx: Any, qkv: Tensor, qk_weight: Tensor, out_weight: Tensor, eps: float, kernel_f: Tensor,
                skip: Tensor, fft_shape: Tuple[int, ...], centre: Tuple[int, ...]) -> Tensor:
        normed, qk_statistics = gate_in(qkv, qk_weight, eps)
        filtered = apply_kernel_fft(normed, kernel_f, fft_shape, centre, skip=skip)
        out, out_statistics = gate_out(qkv, filtered, out_weight, eps)
        ctx.save_for_backward(qkv, filtered, kernel_f, skip, qk_weight, out_weight, qk_statistics, out_statistics)
        ctx.fft = (fft_shape, centre)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        qkv, filtered, kernel_f, skip, qk_weight, out_weight, qk_statistics, out_statistics = ctx.saved_tensors
        grad_qkv = torch.empty_like(qkv, memory_format=torch.channels_last)
        grad_filtered = gate_out_backward(grad, qkv, filtered, out_statistics, out_weight, grad_qkv)
        grad_normed = apply_kernel_fft_adjoint(grad_filtered, kernel_f, *ctx.fft, skip=skip)
        gate_in_backward(grad_normed, qkv, qk_statistics, qk_weight, grad_qkv)
        return grad_qkv, None, None, None, None, None, None, None


def _hooked(modules: Sequence[nn.Module]) -> bool:
    """Whether any of ``modules`` has a forward or backward hook (or pre-hook)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _frozen(modules: Sequence[nn.Module]) -> bool:
    return not any(p.requires_grad for m in modules for p in m.parameters())


def _fusable_mixer(mixer: nn.Module) -> bool:
    """A HyenaPixel mixer with frozen layer norms and implicit long filter, none of them hooked."""
    if not isinstance(mixer, HyenaPixelMixer) or mixer.use_separable_conv:
        return False
    gating = [mixer.qk_norm, mixer.out_norm, mixer.long_conv] if mixer.use_layernorm else [mixer.long_conv]
    return _frozen(gating) and not _hooked(gating)


def _fused_mixer_forward(mixer: HyenaPixelMixer, x: Tensor) -> Tensor:
    """:meth:`HyenaPixelMixer.forward` with :class:`FrozenHyenaPixelGating`: x (B, C, H, W) -> (B, C, H, W)."""
    qkv = mixer.depthwise_conv(mixer.pointwise_conv(x))
    kernel_f, fft_shape = mixer.long_conv.spectrum(qkv.shape[-2:], qkv.device)
    # an override kernel or a kernel modifier that needs its gradient, or autocast: the mixer's own gating
    if kernel_f.requires_grad or torch.is_autocast_enabled(qkv.device.type):
        return mixer.out_proj(mixer.gate(qkv))
    norms = ((mixer.qk_norm.weight, mixer.out_norm.weight, mixer.qk_norm.eps) if mixer.use_layernorm
             else (None, None, 0.0))
    gating = NativeHyenaPixelGating if gates(qkv, *norms[:2]) else FrozenHyenaPixelGating
    y = gating.apply(qkv, *norms, kernel_f, mixer.long_conv.bias, fft_shape, mixer.long_conv.centre)
    return mixer.out_proj(y)


@contextlib.contextmanager
def fused_frozen(model: nn.Module) -> Iterator[None]:
    """Inside the block, frozen StarReLUs and HyenaPixel gatings of ``model`` run fused (module docstring)."""
    patched: List[nn.Module] = []
    for module in model.modules():
        if isinstance(module, StarReLU):
            if module.scale.requires_grad or module.bias.requires_grad or _hooked([module.relu]):
                continue
            module.forward = lambda x, module=module: FrozenStarReLU.apply(x, module.scale, module.bias)
        elif _fusable_mixer(module):
            module.forward = lambda x, module=module: _fused_mixer_forward(module, x)
        else:
            continue
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
