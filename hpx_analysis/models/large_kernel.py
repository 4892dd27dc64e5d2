"""Large-kernel CNNs beside the Hyenas: SLaK and RepLKNet, registered as timm models, on CPU with plain ``conv2d``.

Both follow the official code (SLaK ``models/SLaK.py``, RepLKNet-pytorch ``replknet.py``) key for key, as specified in
``tests/data/golden/large_kernel/README.md``. Their large-kernel module, :class:`LargeKernelConv`, is a sum of
depthwise conv+BN branches that equals ONE depthwise convolution (:meth:`LargeKernelConv.effective_kernel`):

* ``decomposed`` (SLaK): ``LoRA1`` K x s (K along H) + ``LoRA2`` s x K + ``small_conv`` s x s, each with its BN and
  "same" padding per axis ``(kh//2, kw//2)``; the effective kernel is a cross;
* ``square`` (RepLKNet training form): ``lkb_origin`` K x K + ``small_conv`` s x s, each with its BN;
* ``fused`` (RepLKNet deploy form): ``lkb_reparam``, one depthwise conv with bias.

:func:`checkpoint_filter_fn` (used by ``load_model`` for files) reads each block's layout and kernel sizes from the
checkpoint's weight shapes and rebuilds the block to match, so both RepLKNet layouts load into the same model name and
old SLaK files (``Decom1``/``Decom2``, ``lkb_origin``) load too. SLaK checkpoints hold no masks: their sparsity is
exact zeros in the dense weights, which load as they are.

Published weights live on Google Drive, which no hub client reaches: ``default_cfgs`` records the URLs, and
``--weights pretrained`` says where to download the file and to pass it with ``--checkpoint PATH``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, list_models, register_model
from torch import nn

from .long_filters import SquareFilter

BN_EPS = 1e-5
LN_EPS = 1e-6
LAYOUTS = ("decomposed", "square", "fused")


def conv_bn(in_channels: int, out_channels: int, kernel_size: int | Tuple[int, int], stride: int = 1,
            groups: int = 1, relu: bool = False) -> nn.Sequential:
    """Conv (no bias, "same" padding per axis) + BatchNorm (eps 1e-5) [+ ReLU], keys ``conv.*``, ``bn.*``."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    layers: Dict[str, nn.Module] = {
        "conv": nn.Conv2d(in_channels, out_channels, (kh, kw), stride, (kh // 2, kw // 2), groups=groups, bias=False),
        "bn": nn.BatchNorm2d(out_channels, eps=BN_EPS)}
    if relu:
        layers["nonlinear"] = nn.ReLU()
    return nn.Sequential(OrderedDict(layers))


def fuse_conv_bn(branch: nn.Sequential) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight (C_out, C_in/groups, kh, kw), bias (C_out,)) of the single conv equal to ``bn(conv(x))`` in eval mode."""
    bn = branch.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return branch.conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


def embed_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """A (C, 1, kh, kw) kernel zero-padded centred to (C, 1, size, size) (odd sizes: the same "same" convolution)."""
    pad_h, pad_w = (size - kernel.shape[-2]) // 2, (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad_w, pad_w, pad_h, pad_h))


class EffectiveKernelFilter(SquareFilter):
    """The long-filter view of a :class:`LargeKernelConv` (``module.effective_filter``), for the analyzers.

    ``kernel()`` is the module's effective kernel (C, K, K) as a true convolution, like HyenaPixel's: the conv2d
    weight of :meth:`LargeKernelConv.effective_kernel` point-reflected (a cross for SLaK). While a kernel modifier
    or an override is set the module runs as ONE depthwise convolution with this kernel plus the effective bias,
    not as its branches (in eval mode, the same function when the kernel is unchanged). It holds no tensors.
    """

    kind = "large_conv"

    def __init__(self, module: "LargeKernelConv") -> None:
        super().__init__()
        self.channels, self.size = module.channels, module.kernel_size
        self._effective = module.effective_kernel  # a bound method, so the module is no child of its filter

    def base_kernel(self) -> torch.Tensor:
        """The effective kernel (C, K, K), true-convolution orientation."""
        return self._effective()[0][:, 0].flip(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W): one depthwise conv with ``kernel()`` and the effective bias."""
        weight = self.kernel().flip(-2, -1)[:, None].to(x.dtype)
        return F.conv2d(x, weight, self._effective()[1], padding=self.size // 2, groups=self.channels)


class LargeKernelConv(nn.Module):
    """Depthwise large-kernel module (C -> C, stride 1, same size) in one of :data:`LAYOUTS`.

    kernel_size: K; small_kernel: s of the ``small_conv`` branch (None: no such branch); strip_width: the short side
    of SLaK's K x s / s x K strips (``decomposed`` only). ``effective_filter`` (:class:`EffectiveKernelFilter`) is
    the long-filter view of the module: while its kernel is modified or overridden, the module runs as one
    convolution with that kernel and its effective bias instead of its branches.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int] = None,
                 layout: str = "square", strip_width: Optional[int] = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.channels, self.kernel_size, self.small_kernel, self.layout = channels, kernel_size, small_kernel, layout
        self.strip_width = strip_width
        self.effective_filter = EffectiveKernelFilter(self)
        if layout == "fused":
            self.lkb_reparam = nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels)
            return
        if layout == "decomposed":
            self.LoRA1 = conv_bn(channels, channels, (kernel_size, strip_width), groups=channels)
            self.LoRA2 = conv_bn(channels, channels, (strip_width, kernel_size), groups=channels)
        else:
            self.lkb_origin = conv_bn(channels, channels, kernel_size, groups=channels)
        if small_kernel is not None:
            self.small_conv = conv_bn(channels, channels, small_kernel, groups=channels)

    @property
    def long_filter(self) -> EffectiveKernelFilter:
        """The long-filter view the analyses read: the effective kernel."""
        return self.effective_filter

    def branches(self) -> List[nn.Sequential]:
        """The conv+BN branches whose outputs add up (empty for the fused layout)."""
        names = {"decomposed": ("LoRA1", "LoRA2", "small_conv"), "square": ("lkb_origin", "small_conv"), "fused": ()}
        return [getattr(self, name) for name in names[self.layout] if hasattr(self, name)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W); one convolution with the effective kernel while it is modified."""
        if self.effective_filter.active:
            return self.effective_filter(x)
        if self.layout == "fused":
            return self.lkb_reparam(x)
        return sum(branch(x) for branch in self.branches())

    def effective_kernel(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(kernel (C, 1, K, K), bias (C,)) of the one depthwise conv (padding K//2) this module equals in eval mode."""
        if self.layout == "fused":
            return self.lkb_reparam.weight, self.lkb_reparam.bias
        fused = [fuse_conv_bn(branch) for branch in self.branches()]
        kernel = sum(embed_kernel(weight, self.kernel_size) for weight, _ in fused)
        return kernel, sum(bias for _, bias in fused)

    def reparameterized(self) -> "LargeKernelConv":
        """A ``fused`` module computing the same function (RepLKNet's ``merge_kernel``)."""
        fused = LargeKernelConv(self.channels, self.kernel_size, layout="fused")
        kernel, bias = self.effective_kernel()
        with torch.no_grad():
            fused.lkb_reparam.weight.copy_(kernel)
            fused.lkb_reparam.bias.copy_(bias)
        return fused.to(kernel.device).train(self.training)

    @classmethod
    def from_checkpoint(cls, state_dict: Mapping[str, torch.Tensor], prefix: str) -> Optional["LargeKernelConv"]:
        """The module whose layout and kernel sizes fit the ``prefix``-keys of ``state_dict`` (None: no such keys);
        sizes come from the weight shapes, never from names."""
        def shape(name: str) -> Optional[torch.Size]:
            tensor = state_dict.get(f"{prefix}{name}")
            return None if tensor is None else tensor.shape
        small = shape("small_conv.conv.weight")
        small_kernel = None if small is None else small[-1]
        if shape("LoRA1.conv.weight") is not None:
            channels, _, kernel_size, strip_width = shape("LoRA1.conv.weight")
            return cls(channels, kernel_size, small_kernel, "decomposed", strip_width)
        for name, layout in (("lkb_origin.conv.weight", "square"), ("lkb_reparam.weight", "fused")):
            if shape(name) is not None:
                channels, _, kernel_size, _ = shape(name)
                return cls(channels, kernel_size, None if layout == "fused" else small_kernel, layout)
        return None

    def extra_repr(self) -> str:
        strip = f", strip_width={self.strip_width}" if self.layout == "decomposed" else ""
        return (f"{self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"layout={self.layout}{strip}")


def large_kernel_modules(model: nn.Module) -> Dict[str, LargeKernelConv]:
    """Module path -> large-kernel module, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LargeKernelConv)}


def stage_feature_info(widths: Sequence[int]) -> List[Dict[str, Any]]:
    """timm ``feature_info`` of the stage outputs ``stages.i`` (strides 4, 8, 16, ...), e.g. the ERF output."""
    return [{"num_chs": width, "reduction": 4 * 2 ** i, "module": f"stages.{i}"} for i, width in enumerate(widths)]


class _LargeKernelNet(nn.Module):
    """timm-style classifier interface shared by SLaK and RepLKNet."""

    num_classes: int
    num_features: int
    head: nn.Linear

    def stage_steps(self) -> Tuple[nn.Module, List[nn.Module]]:
        """(stem, one step per stage): the stem, then step i maps stage i's input to stage i + 1's, with the
        downsampling between stages inside it (stage-wise analyzers such as truncation run them in turn)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> last stage output (N, C3, h, w): the stem, then every stage step."""
        stem, steps = self.stage_steps()
        x = stem(x)
        for step in steps:
            x = step(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reparameterize(self) -> "_LargeKernelNet":
        """Replace every large-kernel module by its ``fused`` form (same function, fewer keys); returns self."""
        for path, module in large_kernel_modules(self).items():
            self.set_submodule(path, module.reparameterized())
        return self


class SLaKBlock(nn.Module):
    """ConvNeXt block with SLaK's decomposed sparse large kernel: x + gamma * MLP(LN(LK(x))), (N, C, H, W)."""

    def __init__(self, dim: int, kernel_size: int, small_kernel: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.large_kernel = LargeKernelConv(dim, kernel_size, small_kernel if small_kernel < kernel_size else None,
                                            "decomposed", strip_width=small_kernel)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.large_kernel(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class SLaK(_LargeKernelNet):
    """SLaK (Liu et al., ICLR 2023): ConvNeXt with K x s + s x K sparse strips, widths ``int(dims * width_factor)``.

    kernel_sizes: K per stage; small_kernel: s (strip width and small square kernel).
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 kernel_sizes: Sequence[int] = (51, 49, 47, 13), small_kernel: int = 5, width_factor: float = 1.3,
                 num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> None:
        super().__init__()
        widths = [int(dim * width_factor) for dim in dims]
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_chans, widths[0], 4, 4),
                                                              LayerNorm2d(widths[0], eps=LN_EPS))])
        self.downsample_layers.extend(nn.Sequential(LayerNorm2d(widths[i - 1], eps=LN_EPS),
                                                    nn.Conv2d(widths[i - 1], widths[i], 2, 2))
                                      for i in range(1, len(widths)))
        self.stages = nn.ModuleList(nn.Sequential(*[SLaKBlock(width, kernel, small_kernel) for _ in range(depth)])
                                    for depth, width, kernel in zip(depths, widths, kernel_sizes))
        self.norm = nn.LayerNorm(widths[-1], eps=LN_EPS)
        self.head = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = stage_feature_info(widths)

    def stage_steps(self) -> Tuple[nn.Module, List[nn.Module]]:
        """Stem ``downsample_layers.0``; step i > 0 is ``downsample_layers.i`` then ``stages.i`` (the last output
        is (N, C3, H/32, W/32), floors)."""
        steps = [self.stages[0]] + [nn.Sequential(downsample, stage)
                                    for downsample, stage in zip(self.downsample_layers[1:], self.stages[1:])]
        return self.downsample_layers[0], steps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over H, W, then the final LayerNorm, then the head: (N, C3, h, w) -> (N, num_classes)."""
        x = self.norm(x.mean((-2, -1)))
        return x if pre_logits else self.head(x)


class RepLKBlock(nn.Module):
    """x + pw2(ReLU(LK(pw1(BN(x))))), (N, C, H, W); pw1 has BN + ReLU, pw2 BN only."""

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, small_kernel: Optional[int]) -> None:
        super().__init__()
        self.pw1 = conv_bn(channels, dw_channels, 1, relu=True)
        self.pw2 = conv_bn(dw_channels, channels, 1)
        self.large_kernel = LargeKernelConv(dw_channels, kernel_size, small_kernel, "square")
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))


class ConvFFN(nn.Module):
    """x + pw2(GELU(pw1(BN(x)))), 1x1 convs with BN, (N, C, H, W)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.preffn_bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.pw1 = conv_bn(channels, hidden, 1)
        self.pw2 = conv_bn(hidden, channels, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))


class RepLKNetStage(nn.Module):
    """``layers`` pairs of (RepLK block, ConvFFN) in ``blocks``; (N, C, H, W) -> same."""

    def __init__(self, channels: int, layers: int, kernel_size: int, small_kernel: Optional[int], dw_ratio: float,
                 ffn_ratio: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel))
            self.blocks.append(ConvFFN(channels, channels * ffn_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RepLKNet(_LargeKernelNet):
    """RepLKNet (Ding et al., CVPR 2022). ``fused``: build the deploy form (``lkb_reparam``) directly."""

    def __init__(self, layers: Sequence[int] = (2, 2, 18, 2), channels: Sequence[int] = (128, 256, 512, 1024),
                 large_kernel_sizes: Sequence[int] = (31, 29, 27, 13), small_kernel: Optional[int] = 5,
                 dw_ratio: float = 1.0, ffn_ratio: int = 4, num_classes: int = 1000, in_chans: int = 3,
                 fused: bool = False, **kwargs: Any) -> None:
        super().__init__()
        base = channels[0]
        self.num_classes, self.num_features = num_classes, channels[-1]
        self.stem = nn.ModuleList([conv_bn(in_chans, base, 3, 2, relu=True),
                                   conv_bn(base, base, 3, groups=base, relu=True),
                                   conv_bn(base, base, 1, relu=True),
                                   conv_bn(base, base, 3, 2, groups=base, relu=True)])
        self.stages = nn.ModuleList(RepLKNetStage(width, depth, kernel, small_kernel, dw_ratio, ffn_ratio)
                                    for width, depth, kernel in zip(channels, layers, large_kernel_sizes))
        self.transitions = nn.ModuleList(
            nn.Sequential(conv_bn(channels[i], channels[i + 1], 1, relu=True),
                          conv_bn(channels[i + 1], channels[i + 1], 3, 2, groups=channels[i + 1], relu=True))
            for i in range(len(channels) - 1))
        self.norm = nn.BatchNorm2d(channels[-1], eps=BN_EPS)
        self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = stage_feature_info(channels)
        if fused:
            self.reparameterize()

    def stage_steps(self) -> Tuple[nn.Module, List[nn.Module]]:
        """The ``stem`` layers in turn; step i is ``stages.i`` then ``transitions.i`` (none after the last stage;
        every stride-2 step rounds up)."""
        steps = [nn.Sequential(stage, transition) for stage, transition in zip(self.stages, self.transitions)]
        return nn.Sequential(*self.stem), steps + list(self.stages[len(self.transitions):])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final BN, mean over H, W, then the head: (N, C3, h, w) -> (N, num_classes)."""
        x = self.norm(x).mean((-2, -1))
        return x if pre_logits else self.head(x)


_OLD_SLAK_NAMES = re.compile(r"\.Decom([12])\.")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official SLaK/RepLKNet state dict onto ``model``: rename old SLaK branches (``Decom1/2`` -> ``LoRA1/2``),
    strip ``backbone.``, and rebuild every large-kernel module whose layout or kernel sizes differ from the
    checkpoint's (read from the weight shapes: training or deploy RepLKNet, ``lkb_origin`` SLaK, other K)."""
    mapped = {_OLD_SLAK_NAMES.sub(r".LoRA\1.", key.removeprefix("backbone.")): value
              for key, value in state_dict.items()}
    for path, module in large_kernel_modules(model).items():
        wanted = LargeKernelConv.from_checkpoint(mapped, f"{path}.")
        if wanted is not None and wanted.extra_repr() != module.extra_repr():
            model.set_submodule(path, wanted.to(next(module.parameters()).device).train(module.training))
    return mapped


DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"


def _cfg(drive_id: str, notes: str, **kwargs: Any) -> Dict[str, Any]:
    return {"url": DRIVE.format(drive_id), "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "", "classifier": "head", "license": "mit",
            "notes": (notes, "Google Drive only (no hub client reaches it): download by hand, pass --checkpoint PATH"),
            **kwargs}


AT_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
SLAK_ORIGIN = "https://github.com/VITA-Group/SLaK"
REPLKNET_ORIGIN = "https://github.com/DingXiaoH/RepLKNet-pytorch"

default_cfgs = generate_default_cfgs({
    "slak_tiny.in1k": _cfg("1Iut2f5FMS_77jGPYoUJDQzDIXOsax1u4", "SLaK-T 300 ep, 82.5%", origin_url=SLAK_ORIGIN),
    "slak_small.in1k": _cfg("1etM6KQbnlsgDAZ37adsQJ3UI8Bbv2AVe", "SLaK-S 300 ep, 83.8%", origin_url=SLAK_ORIGIN),
    "slak_base.in1k": _cfg("1duUxUD3RSblQ6eDHd0n-u0aulwGypf1j", "SLaK-B 300 ep, 84.0%", origin_url=SLAK_ORIGIN),
    "replknet_31b.in1k": _cfg("1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S", "RepLKNet-31B IN-1K 224, 83.5%",
                              origin_url=REPLKNET_ORIGIN),
    "replknet_31b.in1k_384": _cfg("1vo-P3XB6mRLUeDzmgv90dOu73uCeLfZN", "RepLKNet-31B IN-1K 384, 84.8%",
                                  origin_url=REPLKNET_ORIGIN, **AT_384),
    "replknet_31b.in22k_ft_in1k": _cfg("1DslZ2voXZQR1QoFY9KnbsHAeF84hzS0s", "RepLKNet-31B 22K->1K 224, 85.2%",
                                       origin_url=REPLKNET_ORIGIN),
    "replknet_31b.in22k_ft_in1k_384": _cfg("1Sc46BWdXXm2fVP-K_hKKU_W8vAB-0duX", "RepLKNet-31B 22K->1K 384, 86.0%",
                                           origin_url=REPLKNET_ORIGIN, **AT_384),
    "replknet_31l.in22k_ft_in1k_384": _cfg("1JYXoNHuRvC33QV1pmpzMTKEni1hpWfBl", "RepLKNet-31L 22K->1K 384, 86.6%",
                                           origin_url=REPLKNET_ORIGIN, **AT_384),
    "replknet_xl.in73m_ft_in1k_320": _cfg("1tPC60El34GntXByIRHb-z-Apm4Y5LX1T", "RepLKNet-XL 73M->1K 320, 87.8%",
                                          origin_url=REPLKNET_ORIGIN, input_size=(3, 320, 320), pool_size=(10, 10),
                                          crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


def _create(model_class: type, variant: str, pretrained: bool, defaults: Dict[str, Any],
            **kwargs: Any) -> _LargeKernelNet:
    return build_model_with_cfg(model_class, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**defaults, **kwargs})


SLAK_T = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
SLAK_KERNELS = dict(kernel_sizes=(51, 49, 47, 13), small_kernel=5, width_factor=1.3)
REPLKNET_31 = dict(layers=(2, 2, 18, 2), large_kernel_sizes=(31, 29, 27, 13), small_kernel=5)


@register_model
def slak_tiny(pretrained: bool = False, **kwargs: Any) -> SLaK:
    return _create(SLaK, "slak_tiny", pretrained, {**SLAK_T, **SLAK_KERNELS}, **kwargs)


@register_model
def slak_small(pretrained: bool = False, **kwargs: Any) -> SLaK:
    return _create(SLaK, "slak_small", pretrained, {**SLAK_T, "depths": (3, 3, 27, 3), **SLAK_KERNELS}, **kwargs)


@register_model
def slak_base(pretrained: bool = False, **kwargs: Any) -> SLaK:
    return _create(SLaK, "slak_base", pretrained,
                   dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **SLAK_KERNELS), **kwargs)


@register_model
def replknet_31b(pretrained: bool = False, **kwargs: Any) -> RepLKNet:
    return _create(RepLKNet, "replknet_31b", pretrained, dict(channels=(128, 256, 512, 1024), **REPLKNET_31), **kwargs)


@register_model
def replknet_31l(pretrained: bool = False, **kwargs: Any) -> RepLKNet:
    return _create(RepLKNet, "replknet_31l", pretrained, dict(channels=(192, 384, 768, 1536), **REPLKNET_31), **kwargs)


@register_model
def replknet_xl(pretrained: bool = False, **kwargs: Any) -> RepLKNet:
    return _create(RepLKNet, "replknet_xl", pretrained,
                   dict(layers=(2, 2, 18, 2), channels=(256, 512, 1024, 2048), large_kernel_sizes=(27, 27, 27, 13),
                        small_kernel=None, dw_ratio=1.5), **kwargs)


def model_names() -> List[str]:
    """The model names this module registered with timm."""
    return list_models(module=__name__.rsplit(".", 1)[-1])


__all__ = ["LargeKernelConv", "EffectiveKernelFilter", "SLaK", "RepLKNet", "checkpoint_filter_fn", "large_kernel_modules", "fuse_conv_bn",
           "embed_kernel", "model_names"]
