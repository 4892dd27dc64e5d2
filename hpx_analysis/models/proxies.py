"""Tiny proxy models for the offline demo: a HyenaPixel MetaFormer and a ConvFormer-style MetaFormer
of equal parameter budget (36.3k vs 37.0k), both 2 stages at 64 px with 2 classes.

Registered as timm models (``proxy_hpx_former``, ``proxy_convformer``), so a trained proxy loads
like any other model: ``hpx-analyze erf --model proxy_hpx_former --checkpoint <file>``. Stage
feature maps are 16 x 16 and 8 x 8; the HyenaPixel long kernels span 2F - 1 = 31 and 15 taps
(global), the ConvFormer mixers are 7 x 7 depthwise convolutions (local).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .hyenapixel import HyenaPixelFormer, _cfg, checkpoint_filter_fn

PROXY_INPUT = 64
PROXY_DEPTHS = (1, 1)
PROXY_DIMS = (16, 32)
PROXY_SPECS = {
    "proxy_hpx_former": [{"type": "hpx", "long_kernel_size": k, "filter_emb_dim": 16, "use_layernorm": True}
                         for k in (31, 15)],
    # expansion 3 (timm's default is 2) brings the ConvFormer to the HyenaPixel proxy's parameter count
    "proxy_convformer": [{"type": "sepconv", "expansion_ratio": 3}] * 2,
}
PROXY_NAMES = tuple(PROXY_SPECS)

default_cfgs = generate_default_cfgs({
    name: _cfg(num_classes=2, input_size=(3, PROXY_INPUT, PROXY_INPUT), pool_size=(4, 4), interpolation="bilinear",
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), license="apache-2.0")
    for name in PROXY_NAMES
})


def _create_proxy(name: str, pretrained: bool, **kwargs: Any) -> HyenaPixelFormer:
    kwargs.setdefault("num_classes", 2)
    return build_model_with_cfg(HyenaPixelFormer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(PROXY_DEPTHS)))),
                                mixer_specs=PROXY_SPECS[name], depths=PROXY_DEPTHS, dims=PROXY_DIMS, **kwargs)


@register_model
def proxy_hpx_former(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create_proxy("proxy_hpx_former", pretrained, **kwargs)


@register_model
def proxy_convformer(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create_proxy("proxy_convformer", pretrained, **kwargs)
