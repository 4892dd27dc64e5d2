"""Tiny proxy models for the offline demo: a HyenaPixel MetaFormer, a ConvFormer-style MetaFormer and a
Hyena N-D ViT of nearly equal parameter budget (53.9k, 52.8k, 53.4k), 16 x 16 tokens at 64 px, 2 classes.

Registered as timm models (``proxy_hpx_former``, ``proxy_convformer``, ``proxy_hyena_nd``), so a trained
proxy loads like any other model: ``hpx-analyze erf --model proxy_hpx_former --checkpoint <file>``.

- HyenaPixel: long kernels of 2F - 1 = 31 taps (global), the published 5 x 5 short convs. Its short
  path sees at most 7 + 4 * 4 = 23 px, so only the long filter can relate two marks >= 32 px apart.
  The implicit filter starts from a sine frequency of 10, windows reaching 1 / 0.3 times further and a
  10x output gain instead of the published initialisation: with the published one, timm's std-0.02
  weight init leaves the long path ~1e-5 of the skip path and the proxy never learns to use it in a
  CPU budget (README, "Run the demo").
- ConvFormer: 7 x 7 depthwise mixers (local; a token sees at most 7 + 6 * 4 = 31 px).
- Hyena N-D: a ViT of three blocks (width 24, filter width 46, patch 4, one head), directions ``seq`` (blocks
  1 and 3 anti-causal, block 2 causal), no window (the reference's ``window_mode="no"``; the frozen standard
  window leaves the far taps below 2e-3 of the near ones), the head reading token 0 (top-left). Only the
  product ``x0 * long(v)`` at one mark can relate it to the other, and only an anti-causal block can carry
  that to token 0, hence three blocks (with a planted row kernel in block 1 the rest learns in 250 steps).
  Its filter network reads 17 positional features per axis instead of the reference's 3 and starts with a
  30x output gain (``filter_emb_dim``, ``filter_output_gain``): with 3 features the random kernel is too
  smooth across rows (row offsets 0 and 3 correlate 0.99), with the published 1x gain its taps are ~0.002 of
  the skip path. Even so, trained at the full rate the filter changes faster than the rest learns to read
  it (loss at ln 2 for 1,200 steps, seeds 0-2); the demo trains the filter networks at 1/100 of the rate
  (:class:`hpx_analysis.demo.training.TrainingConfig` ``filter_lr_scale``), which learns in about 450 steps.
"""

from __future__ import annotations

from typing import Any, Dict

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .hyena_nd import HyenaNDViT, _cfg as _vit_cfg
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
HYENA_ND_PROXY = "proxy_hyena_nd"
HYENA_ND_OPTIONS = dict(img_size=PROXY_INPUT, patch_size=4, embed_dim=24, depth=3, num_heads=1, filter_width=46,
                        directions="seq", window="no", filter_emb_dim=17, filter_output_gain=30.0)
PROXY_NAMES = (*PROXY_SPECS, HYENA_ND_PROXY)

_PROXY_CFG = dict(num_classes=2, input_size=(3, PROXY_INPUT, PROXY_INPUT), crop_pct=1.0, interpolation="bilinear",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), license="apache-2.0")  # crop_pct 1: whole 64 px images
default_cfgs = generate_default_cfgs({
    **{name: _cfg(pool_size=(16, 16), **_PROXY_CFG) for name in PROXY_SPECS},
    HYENA_ND_PROXY: _vit_cfg(**_PROXY_CFG),
})


def proxy_configuration(name: str) -> Dict[str, Any]:
    """Everything that builds proxy ``name``: its architecture options (mixer specs, widths, depths, or the Hyena
    N-D options, init options included) and its pretrained config (input size, normalisation); part of the demo
    cache's key, so a changed architecture or initialisation is retrained."""
    if name == HYENA_ND_PROXY:
        architecture: Dict[str, Any] = {"class": HyenaNDViT.__name__, **HYENA_ND_OPTIONS}
    else:
        architecture = {"class": HyenaPixelFormer.__name__, "mixer_specs": PROXY_SPECS[name],
                        "depths": PROXY_DEPTHS, "dims": PROXY_DIMS[name]}
    return {"name": name, "architecture": architecture, "pretrained_cfg": default_cfgs[name].default.to_dict()}


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


@register_model
def proxy_hyena_nd(pretrained: bool = False, **kwargs: Any) -> HyenaNDViT:
    kwargs.setdefault("num_classes", 2)
    return build_model_with_cfg(HyenaNDViT, HYENA_ND_PROXY, pretrained, **{**HYENA_ND_OPTIONS, **kwargs})
