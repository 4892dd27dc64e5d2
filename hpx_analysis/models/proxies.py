"""Tiny proxy models for the offline demo: a HyenaPixel MetaFormer and a ConvFormer-style MetaFormer
of nearly equal parameter budget (53.9k vs 52.8k), one stage of 16 x 16 tokens at 64 px, 2 classes.

Registered as timm models (``proxy_hpx_former``, ``proxy_convformer``), so a trained proxy loads
like any other model: ``hpx-analyze erf --model proxy_hpx_former --checkpoint <file>``.

- HyenaPixel: long kernels of 2F - 1 = 31 taps (global), the published 5 x 5 short convs. Its short
  path sees at most 7 + 4 * 4 = 23 px, so only the long filter can relate two marks >= 32 px apart.
  The implicit filter starts from a sine frequency of 10, windows reaching 1 / 0.3 times further and a
  10x output gain instead of the published initialisation: with the published one, timm's std-0.02
  weight init leaves the long path ~1e-5 of the skip path and the proxy never learns to use it in a
  CPU budget (README, "Run the demo").
- ConvFormer: 7 x 7 depthwise mixers (local; a token sees at most 7 + 6 * 4 = 31 px).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .hyenapixel import HyenaPixelFormer, _cfg, checkpoint_filter_fn

PROXY_INPUT = 64
PROXY_DEPTHS = (1,)
PROXY_DIMS = {"proxy_hpx_former": (32,), "proxy_convformer": (46,)}
PROXY_SPECS = {
    "proxy_hpx_former": [{"type": "hpx", "long_kernel_size": 31, "filter_emb_dim": 64, "use_layernorm": True,
                          "filter_sin_init": 10.0, "filter_decay_scale": 0.3, "filter_output_gain": 10.0}],
    # width 46 and expansion 3 bring the ConvFormer to the HyenaPixel proxy's parameter count
    "proxy_convformer": [{"type": "sepconv", "expansion_ratio": 3}],
}
PROXY_NAMES = tuple(PROXY_SPECS)

default_cfgs = generate_default_cfgs({
    name: _cfg(num_classes=2, input_size=(3, PROXY_INPUT, PROXY_INPUT), pool_size=(16, 16), interpolation="bilinear",
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), license="apache-2.0")
    for name in PROXY_NAMES
})


def _create_proxy(name: str, pretrained: bool, **kwargs: Any) -> HyenaPixelFormer:
    kwargs.setdefault("num_classes", 2)
    return build_model_with_cfg(HyenaPixelFormer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(PROXY_DEPTHS)))),
                                mixer_specs=PROXY_SPECS[name], depths=PROXY_DEPTHS, dims=PROXY_DIMS[name], **kwargs)


@register_model
def proxy_hpx_former(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create_proxy("proxy_hpx_former", pretrained, **kwargs)


@register_model
def proxy_convformer(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create_proxy("proxy_convformer", pretrained, **kwargs)
