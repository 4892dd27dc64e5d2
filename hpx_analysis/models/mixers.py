"""Token mixers of the HyenaPixel model family, in timm's MetaFormer NCHW block layout.

Module and tensor names follow the reference implementation, so the published state dicts load
after the MetaFormer-level key mapping of :mod:`hpx_analysis.models.hyenapixel`.
"""

from __future__ import annotations

from typing import Any, Optional

from timm.models.metaformer import LayerNorm2dNoBias
from torch import Tensor, nn

from .long_filters import HyenaFilter1D, HyenaPixelFilter

MIXER_NORM_EPS = 1e-5


class HyenaPixelMixer(nn.Module):
    """HyenaPixel operator ``y = v * long(norm(q * k))`` on (B, C, H, W) feature maps.

    q, k, v come from a pointwise conv C->3C and a depthwise 5x5 conv. With ``use_layernorm`` the
    product q*k and the output are normalised (bias-free LayerNorm over channels) before the
    output projection. With ``use_separable_conv`` the implicit long filter is replaced by two
    explicit depthwise convolutions (S,1) then (1,S), the paper's "SC" ablation. ``filter_sin_init``,
    ``filter_decay_scale`` and ``filter_output_gain`` set the implicit filter's initialisation
    (:class:`HyenaPixelFilter`; defaults as published).
    """

    def __init__(self, dim: int, long_kernel_size: int = 111, filter_emb_dim: int = 32,
                 use_layernorm: bool = True, use_separable_conv: bool = False, filter_sin_init: float = 1.0,
                 filter_decay_scale: float = 1.0, filter_output_gain: float = 1.0, **kwargs: Any):
        super().__init__()
        self.dim, self.use_layernorm, self.use_separable_conv = dim, use_layernorm, use_separable_conv
        self.pointwise_conv = nn.Conv2d(dim, 3 * dim, 1)
        self.depthwise_conv = nn.Conv2d(3 * dim, 3 * dim, 5, padding=2, groups=3 * dim)
        if use_separable_conv:
            pad = long_kernel_size // 2
            self.long_horizontal_conv = nn.Conv2d(dim, dim, (long_kernel_size, 1), padding=(pad, 0), groups=dim)
            self.long_vertical_conv = nn.Conv2d(dim, dim, (1, long_kernel_size), padding=(0, pad), groups=dim)
        else:
            self.long_conv = HyenaPixelFilter(dim, long_kernel_size, filter_emb_dim, sin_init=filter_sin_init,
                                              decay_scale=filter_decay_scale, output_gain=filter_output_gain)
        if use_layernorm:
            self.qk_norm = LayerNorm2dNoBias(dim, eps=MIXER_NORM_EPS)
            self.out_norm = LayerNorm2dNoBias(dim, eps=MIXER_NORM_EPS)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    @property
    def long_filter(self) -> Optional[HyenaPixelFilter]:
        """The implicit long filter the analyses read (None for the separable-convolution ablation)."""
        return None if self.use_separable_conv else self.long_conv

    def long(self, u: Tensor) -> Tensor:
        """The global (or separable) filter: (B, C, H, W) -> (B, C, H, W)."""
        if self.use_separable_conv:
            return self.long_vertical_conv(self.long_horizontal_conv(u))
        return self.long_conv(u)

    def gate(self, qkv: Tensor) -> Tensor:
        """The gating ``v * long(norm(q * k))`` (normed): qkv (B, 3C, H, W) -> (B, C, H, W)."""
        q, k, v = qkv.chunk(3, dim=1)
        u = q * k
        if self.use_layernorm:
            u = self.qk_norm(u)
        y = v * self.long(u)
        if self.use_layernorm:
            y = self.out_norm(y)
        return y

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return self.out_proj(self.gate(self.depthwise_conv(self.pointwise_conv(x))))


class HyenaMixer(nn.Module):
    """Hyena operator on the row-major flattened feature map (bidirectional ``hb`` or causal).

    (B, C, H, W) -> sequence (B, L, C), L = H*W; linear C->3C, depthwise conv1d k=3; split into
    x0, x1, v; ``v = norm(v * x1)``, ``v = h conv v + v * bias``, ``y = norm(v * x0)``, linear C->C.
    """

    def __init__(self, dim: int, l_max: int = 3136, emb_dim: int = 33, filter_order: int = 64,
                 use_layernorm: bool = False, is_causal: bool = False, **kwargs: Any):
        super().__init__()
        self.dim, self.l_max, self.is_causal, self.use_layernorm = dim, l_max, is_causal, use_layernorm
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.short_filter = nn.Conv1d(3 * dim, 3 * dim, 3, padding=2 if is_causal else 1, groups=3 * dim)
        self.filter_fn = HyenaFilter1D(dim, l_max, emb_dim, filter_order, causal=is_causal)
        if use_layernorm:
            self.qk_norm = nn.Sequential(nn.LayerNorm(dim, eps=MIXER_NORM_EPS, bias=False))
            self.out_norm = nn.LayerNorm(dim, eps=MIXER_NORM_EPS, bias=False)

    @property
    def long_filter(self) -> HyenaFilter1D:
        """The implicit long filter the analyses read."""
        return self.filter_fn

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        length = height * width
        if self.is_causal and length != self.l_max:
            raise ValueError(f"causal Hyena layer was built for sequence length {self.l_max} "
                             f"but got {height}x{width}={length}; run it at its training resolution")
        seq = self.in_proj(x.flatten(2).transpose(1, 2)).transpose(1, 2)
        seq = self.short_filter(seq)[..., :length]
        x0, x1, v = seq.chunk(3, dim=1)
        v = v * x1
        if self.use_layernorm:
            v = self.qk_norm(v.transpose(1, 2)).transpose(1, 2)
        y = self.filter_fn(v) * x0
        y = y.transpose(1, 2)
        if self.use_layernorm:
            y = self.out_norm(y)
        y = self.out_proj(y)
        return y.transpose(1, 2).reshape(batch, channels, height, width)

