"""Model zoo: HyenaPixel variants registered with timm, loading, and reference backbones."""

from .hyenapixel import (PUBLISHED, HyenaPixelFormer, checkpoint_filter_fn, model_from_config, model_names)
from .long_filters import HyenaFilter1D, HyenaPixelFilter, LongFilterBase, fft_conv_same
from .mixers import HyenaMixer, HyenaPixelMixer
from .proxies import PROXY_NAMES

__all__ = ["model_names", "PUBLISHED", "HyenaPixelFormer", "checkpoint_filter_fn", "model_from_config",
           "HyenaFilter1D", "HyenaPixelFilter", "LongFilterBase", "fft_conv_same", "HyenaMixer", "HyenaPixelMixer", "PROXY_NAMES"]
