"""One paper style for every figure, and saving as vector PDF + PNG with metadata alongside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib
import matplotlib.pyplot as plt

PAPER_RC: Dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.dpi": 150,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # embed TrueType: text stays editable in the PDF
    "ps.fonttype": 42,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.interpolation": "nearest",
}
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"


def paper_style() -> "matplotlib.rc_context":
    """Context manager applying the paper rcParams: ``with paper_style(): fig = ...``."""
    return matplotlib.rc_context(PAPER_RC)


def save_figure(fig: "plt.Figure", stem: Path | str, metadata: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Write ``<stem>.pdf`` and ``<stem>.png`` (and ``<stem>.figure.json`` with metadata); closes fig."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with paper_style():
        for suffix in (".pdf", ".png"):
            path = stem.with_suffix(suffix)
            fig.savefig(path, metadata={"Creator": "hpx-analysis"} if suffix == ".pdf" else None)
            written.append(path)
    if metadata is not None:
        from ..provenance import provenance_versions
        from ..results import to_jsonable
        from ..storage import write_text_atomic
        meta_path = stem.parent / f"{stem.name}.figure.json"
        write_text_atomic(meta_path, json.dumps(to_jsonable({"versions": provenance_versions(), **metadata}), indent=2))
        written.append(meta_path)
    plt.close(fig)
    return written
