"""Model zoo: HyenaPixel, Hyena N-D and large-kernel (SLaK, RepLKNet) models registered with timm, loading, and
reference backbones."""

from .hyenapixel import (PUBLISHED, HyenaPixelFormer, checkpoint_filter_fn, model_from_config, model_names)
from .large_kernel import LargeKernelConv, RepLKNet, SLaK
from .long_filters import HyenaFilter1D, HyenaPixelFilter, LongFilterBase, fft_conv_same
from .mixers import HyenaMixer, HyenaPixelMixer
from .proxies import PROXY_NAMES
from . import hyena_nd, large_kernel
from .hyena_nd import HyenaNDMixer, HyenaNDViT

__all__ = ["model_names", "PUBLISHED", "HyenaPixelFormer", "checkpoint_filter_fn", "model_from_config",
           "HyenaFilter1D", "HyenaPixelFilter", "LongFilterBase", "fft_conv_same", "HyenaMixer", "HyenaPixelMixer", "PROXY_NAMES",
           "LargeKernelConv", "SLaK", "RepLKNet", "hyena_nd", "large_kernel", "HyenaNDMixer", "HyenaNDViT"]
