"""hpx-analysis: analysis and interpretability toolkit for HyenaPixel vision models."""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the HyenaPixel entrypoints with timm)
