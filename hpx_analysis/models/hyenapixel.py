"""HyenaPixel / Hyena MetaFormers built on timm's MetaFormer, registered as timm models.

After ``import hpx_analysis``, ``timm.create_model("hpx_former_s18")`` works, including
``pretrained=True`` through :func:`checkpoint_filter_fn`, which maps the reference key layout onto timm's.
``default_cfgs`` is the one place that says where published weights live (Hugging Face hub id
``Spravil/<name>.westai_in1k`` and file ``pytorch_model.bin``); :func:`model_names` asks timm's registry
which names this module registered.

A model is described by depths, dims and one token-mixer spec per stage, for example
``{"type": "hpx", "long_kernel_size": 111, "filter_emb_dim": 32, "use_layernorm": True}``
(types: ``hpx``, ``hb``, ``sepconv``, ``attention``), the same form as the golden tiny configs.
"""

from __future__ import annotations

import copy
import re
from functools import partialmethod
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, list_models, register_model
from timm.models.metaformer import (Attention, Downsampling, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer,
                                    MlpHead, SepConv)
from torch import nn

from .long_filters import HyenaPixelFilter
from .mixers import HyenaMixer, HyenaPixelMixer

HEAD_NORM_EPS = 1e-5  # the reference MLP head normalises its hidden layer with nn.LayerNorm's default eps

MixerSpec = Dict[str, Any]

_MIXER_CLASSES = {"hpx": HyenaPixelMixer, "hb": HyenaMixer, "sepconv": SepConv, "attention": Attention}


def _configured_mixer(spec: Mapping[str, Any]) -> type:
    """A subclass of the spec's mixer class with the spec's options bound (timm passes only dim).

    timm needs a class here (it tests ``issubclass(mixer, Attention)``), so a ``functools.partial`` does not
    do; :class:`HyenaPixelFormer` turns the built mixers back into instances of the plain class, which
    pickle by reference.
    """
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        base = _MIXER_CLASSES[spec["type"]]
    except KeyError:
        raise ValueError(f"unknown token mixer type {spec.get('type')!r}; known: {sorted(_MIXER_CLASSES)}") from None
    if spec["type"] == "attention":
        options.setdefault("head_dim", 32)
    return type(base.__name__, (base,), {"__init__": partialmethod(base.__init__, **options), "configured_base": base})


class HyenaPixelFormer(MetaFormer):
    """timm MetaFormer with one configurable token mixer per stage and the reference's conventions.

    Differences from timm's defaults, each needed to compute what the published checkpoints
    compute: every stage after the first downsamples (also when dims repeat), and the MLP head's
    hidden LayerNorm uses eps 1e-5.
    """

    def __init__(self, mixer_specs: Sequence[MixerSpec], depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (64, 128, 320, 512), **kwargs: Any):
        if len(mixer_specs) != len(depths) or len(dims) != len(depths):
            raise ValueError(f"need one mixer spec and dim per stage: {len(depths)} stages, "
                             f"{len(mixer_specs)} specs, {len(dims)} dims")
        self.mixer_specs = [dict(s) for s in mixer_specs]
        norm_layers = [LayerNormNoBias if s["type"] == "attention" else LayerNorm2dNoBias for s in mixer_specs]
        super().__init__(depths=tuple(depths), dims=tuple(dims),
                         token_mixers=[_configured_mixer(s) for s in mixer_specs],
                         norm_layers=norm_layers, **kwargs)
        for i in range(1, len(depths)):
            if isinstance(self.stages[i].downsample, nn.Identity):
                self.stages[i].downsample = Downsampling(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1,
                                                         norm_layer=LayerNorm2dNoBias)
                self.stages[i].downsample.apply(self._init_weights)
        if isinstance(self.head.fc, MlpHead):
            self.head.fc.norm.eps = HEAD_NORM_EPS
        for module in self.modules():
            if isinstance(module, HyenaPixelFilter):  # after timm's weight init, which re-draws every conv
                module.apply_output_gain()
            if "configured_base" in vars(type(module)):  # the subclass only bound constructor options
                module.__class__ = type(module).configured_base

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        super().reset_classifier(num_classes, *args, **kwargs)
        if isinstance(self.head.fc, MlpHead):
            self.head.fc.norm.eps = HEAD_NORM_EPS


# --- checkpoint key mapping ----------------------------------------------------------------------

_KEY_RULES = [
    (re.compile(r"^downsample_layers\.0\.conv\."), "stem.conv."),
    (re.compile(r"^downsample_layers\.0\.post_norm\."), "stem.norm."),
    (re.compile(r"^downsample_layers\.(\d+)\.pre_norm\."), r"stages.\1.downsample.norm."),
    (re.compile(r"^downsample_layers\.(\d+)\.conv\."), r"stages.\1.downsample.conv."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"^norm\."), "head.norm."),
    (re.compile(r"^head\.(fc1|fc2|norm)\."), r"head.fc.\1."),
]


def reference_key_to_timm(key: str) -> str:
    """Map one key of the reference (published checkpoint) layout to this project's timm layout."""
    for pattern, replacement in _KEY_RULES:
        key, count = pattern.subn(replacement, key)
        if count:
            break
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a reference-layout state dict onto ``model``'s keys, reshaping linear <-> 1x1-conv weights.

    State dicts already in this project's layout (``stem.conv.weight`` present) pass unchanged
    apart from the reshape. Keys the model does not have are kept, so that strict loading names them.
    """
    own = model.state_dict()
    already_mapped = "stem.conv.weight" in state_dict
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key if already_mapped else reference_key_to_timm(key)
        target = own.get(new_key)
        if target is not None and value.shape != target.shape and value.numel() == target.numel():
            value = value.reshape(target.shape)
        out[new_key] = value
    return out


# --- published variants and other sizes ----------------------------------------------------------

S18 = dict(depths=(3, 3, 9, 3), dims=(64, 128, 320, 512))
SIZES = {
    "s4": dict(depths=(1, 1, 1, 1), dims=(64, 128, 320, 512)),
    "s12": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512)),
    "s18": S18,
    "b36": dict(depths=(3, 12, 18, 3), dims=(128, 256, 512, 768)),
}
HPX_KERNEL_SIZES = (111, 55, 27, 13)   # 2F-1 for F = 56, 28, 14, 7 at 224 px
HPX_EMB_DIMS = (32, 32, 48, 64)
HB_SEQ_LENS = (56 * 56, 28 * 28, 14 * 14, 7 * 7)
HB_EMB_DIMS = (33, 33, 49, 65)          # 1 + 2 * bands, bands = 16, 16, 24, 32
HB_ORDERS = (64, 64, 96, 128)           # hidden width 2K of the implicit filter


def hpx_spec(stage: int, use_layernorm: bool = True, **overrides: Any) -> MixerSpec:
    """HyenaPixel spec of stage ``stage`` (0-3) with the paper's hyper-parameters."""
    return {"type": "hpx", "long_kernel_size": HPX_KERNEL_SIZES[stage], "filter_emb_dim": HPX_EMB_DIMS[stage],
            "use_layernorm": use_layernorm, **overrides}


def hb_spec(stage: int, use_layernorm: bool = False, **overrides: Any) -> MixerSpec:
    """Bidirectional Hyena spec of stage ``stage`` (0-3) with the paper's hyper-parameters."""
    return {"type": "hb", "l_max": HB_SEQ_LENS[stage], "emb_dim": HB_EMB_DIMS[stage], "filter_order": HB_ORDERS[stage],
            "use_layernorm": use_layernorm, "is_causal": False, **overrides}


def _layout(name: str, size: str) -> List[MixerSpec]:
    """Mixer specs of a layout: hpx_former, hb_former, c_hpx_former, hpx_a_former, hb_a_former."""
    attention = {"type": "attention"}
    sepconv = {"type": "sepconv"}
    # B36 variants and hpx_former use the normalised mixers; the others were trained without them
    with_ln = size == "b36" or name == "hpx_former"
    layouts = {
        "hpx_former": [hpx_spec(i, with_ln) for i in range(4)],
        "hb_former": [hb_spec(i, with_ln) for i in range(4)],
        "c_hpx_former": [sepconv, sepconv, hpx_spec(2, False), hpx_spec(3, False)],
        "hpx_a_former": [hpx_spec(0, False), hpx_spec(1, False), attention, attention],
        "hb_a_former": [hb_spec(0, False), hb_spec(1, False), attention, attention],
    }
    return copy.deepcopy(layouts[name])


def apply_options(specs: List[MixerSpec], long_kernel_sizes: Optional[Sequence[Optional[int]]] = None,
                  use_separable_conv: bool = False, is_causal: bool = False) -> List[MixerSpec]:
    """The paper's ablations as options: per-stage long-kernel size, separable long conv, causal Hyena."""
    for i, spec in enumerate(specs):
        if long_kernel_sizes is not None and long_kernel_sizes[i] is not None and spec["type"] == "hpx":
            spec["long_kernel_size"] = int(long_kernel_sizes[i])
        if use_separable_conv and spec["type"] == "hpx":
            spec["use_separable_conv"] = True
        if is_causal and spec["type"] == "hb":
            spec["is_causal"] = True
    return specs


def _create(variant: str, pretrained: bool, layout: str, size: str, **kwargs: Any) -> HyenaPixelFormer:
    option_names = ("long_kernel_sizes", "use_separable_conv", "is_causal")
    options = {k: kwargs.pop(k) for k in option_names if k in kwargs}
    specs = apply_options(_layout(layout, size), **options)
    depths = SIZES[size]["depths"]
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_model_with_cfg(
        HyenaPixelFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        mixer_specs=specs, **SIZES[size], **kwargs,
    )


def _cfg(hub_name: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "hf_hub_id": f"Spravil/{hub_name}" if hub_name else None, "hf_hub_filename": "pytorch_model.bin",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "classifier": "head.fc.fc2", "first_conv": "stem.conv", "license": "mit", **kwargs,
    }


PUBLISHED = ("hpx_former_s18", "hpx_former_s18_384", "hb_former_s18", "c_hpx_former_s18", "hpx_a_former_s18",
             "hb_a_former_s18", "hpx_former_b36", "hb_former_b36")

AT_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12))

# Tags in the order a loader tries them: the authors list one hub id for the 384 model, their loader another.
default_cfgs = generate_default_cfgs({
    **{f"{name}.westai_in1k": _cfg(f"{name}.westai_in1k") for name in PUBLISHED if name != "hpx_former_s18_384"},
    "hpx_former_s18_384.westai_in1k_384": _cfg("hpx_former_s18.westai_in1k_384", **AT_384),
    "hpx_former_s18_384.westai_in1k_ema_384": _cfg("hpx_former_s18.westai_in1k_ema_384", **AT_384),
    **{f"{layout}_{size}": _cfg() for layout in ("hpx_former", "hb_former") for size in ("s4", "s12")},
})


@register_model
def hpx_former_s4(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hpx_former_s4", pretrained, "hpx_former", "s4", **kwargs)


@register_model
def hpx_former_s12(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hpx_former_s12", pretrained, "hpx_former", "s12", **kwargs)


@register_model
def hpx_former_s18(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hpx_former_s18", pretrained, "hpx_former", "s18", **kwargs)


@register_model
def hpx_former_s18_384(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hpx_former_s18_384", pretrained, "hpx_former", "s18", **kwargs)


@register_model
def hpx_former_b36(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hpx_former_b36", pretrained, "hpx_former", "b36", **kwargs)


@register_model
def hb_former_s4(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hb_former_s4", pretrained, "hb_former", "s4", **kwargs)


@register_model
def hb_former_s12(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hb_former_s12", pretrained, "hb_former", "s12", **kwargs)


@register_model
def hb_former_s18(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hb_former_s18", pretrained, "hb_former", "s18", **kwargs)


@register_model
def hb_former_b36(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hb_former_b36", pretrained, "hb_former", "b36", **kwargs)


@register_model
def c_hpx_former_s18(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("c_hpx_former_s18", pretrained, "c_hpx_former", "s18", **kwargs)


@register_model
def hpx_a_former_s18(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hpx_a_former_s18", pretrained, "hpx_a_former", "s18", **kwargs)


@register_model
def hb_a_former_s18(pretrained: bool = False, **kwargs: Any) -> HyenaPixelFormer:
    return _create("hb_a_former_s18", pretrained, "hb_a_former", "s18", **kwargs)


def model_names() -> List[str]:
    """The model names this module registered with timm (timm files them under the module's last name part)."""
    return list_models(module=__name__.rsplit(".", 1)[-1])


def model_from_config(config: Mapping[str, Any], **kwargs: Any) -> HyenaPixelFormer:
    """Build a model from a config dict: ``depths``, ``dims``, ``token_mixers`` (one spec per stage),
    optional ``num_classes`` (the form of the golden tiny ``*.json`` files)."""
    missing = [k for k in ("depths", "dims", "token_mixers") if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    options = {"num_classes": config.get("num_classes", 1000), **kwargs}
    model = HyenaPixelFormer(config["token_mixers"], depths=config["depths"], dims=config["dims"], **options)
    model.pretrained_cfg = _cfg(num_classes=options["num_classes"],
                                input_size=tuple(config.get("input_size", (3, 224, 224))))
    return model
