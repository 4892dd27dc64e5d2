"""Plotting: results -> matplotlib figures in one paper style. Never computes analyses."""

from .style import DIVERGING_CMAP, SEQUENTIAL_CMAP, paper_style, save_figure

__all__ = ["DIVERGING_CMAP", "SEQUENTIAL_CMAP", "paper_style", "save_figure"]
