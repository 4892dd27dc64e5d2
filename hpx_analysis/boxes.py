"""Object bounding boxes of input images, and where they land after the model's evaluation transform.

Files (:func:`read_boxes`): ImageNet's validation boxes as distributed, Pascal VOC XML with one file per image (a
folder of ``.xml`` files, or the ``.tgz`` / ``.tar.gz`` / ``.tar`` holding them, e.g. ``ILSVRC2012_bbox_val_v3.tgz``),
or a CSV ``filename,xmin,ymin,xmax,ymax`` (header row optional; several rows of one file are several boxes). Boxes
are matched to images by file-name stem (``val/ILSVRC2012_val_00000001.xml`` and the CSV name
``ILSVRC2012_val_00000001.JPEG`` both name the image ``n01751748/ILSVRC2012_val_00000001.JPEG``).

Coordinates are continuous pixel-edge coordinates of the original image: x = 0 is the left edge of the first column,
x = width the right edge of the last (ImageNet's boxes run from 0 to the width and height). A pixel (row r, column c)
lies in a box when its centre does: ``xmin <= c + 0.5 < xmax`` and ``ymin <= r + 0.5 < ymax``.

Geometry (:func:`transform_boxes`) follows the steps of the transform itself, a torchvision ``Compose`` as timm's
``create_transform`` builds it (``images.eval_transform``):

- a resize (torchvision ``Resize``, timm ``ResizeKeepRatio``) scales x by new_w / w and y by new_h / h, with the
  output size the step itself gives an image of size (w, h) (it is applied to a blank image, so its own rounding
  holds: timm's eval transform resizes the shorter side to ``floor(size / crop_pct)`` and the longer one to
  ``int(that * long / short)``);
- a ``CenterCrop`` to (h, w) shifts by torchvision's offsets ``top = int(round((H - h) / 2))``,
  ``left = int(round((W - w) / 2))`` (Python rounds halves to even), after padding a side shorter than the crop by
  ``(w - W) // 2`` on the left and top, as torchvision does;
- tensor conversion and normalisation leave the geometry alone; any other step is refused.

Boxes are then clipped to the output, and a box holding no pixel centre there is dropped.
"""

from __future__ import annotations

import csv
import tarfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .errors import HpxError
from .images import ImageSource

BOX_COLUMNS = ("filename", "xmin", "ymin", "xmax", "ymax")
TAR_SUFFIXES = (".tgz", ".tar.gz", ".tar")


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image: ``boxes`` (K, 4) float64 ``xmin, ymin, xmax, ymax`` in original pixel-edge
    coordinates, and ``size`` (width, height) as the file states it (VOC XML), None when it does not (CSV)."""

    boxes: np.ndarray
    size: Optional[Tuple[int, int]] = None


def _checked(boxes: np.ndarray, where: str) -> np.ndarray:
    """``boxes`` (K, 4) as float64, refusing non-finite values and empty extents."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all() or (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
        raise HpxError(f"{where}: a box needs xmin < xmax and ymin < ymax (finite numbers)")
    return boxes


def parse_voc(text: bytes | str, where: str) -> ImageBoxes:
    """The boxes and image size of one Pascal VOC annotation (``<object><bndbox>`` and ``<size>``)."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as err:
        raise HpxError(f"{where} is not a Pascal VOC XML file ({err})") from None
    try:
        boxes = [[float(box.findtext(side)) for side in BOX_COLUMNS[1:]] for box in root.iter("bndbox")]
        width, height = (int(float(root.findtext(f"size/{side}") or 0)) for side in ("width", "height"))
    except (TypeError, ValueError):
        raise HpxError(f"{where}: every <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
    return ImageBoxes(_checked(np.array(boxes), where), (width, height) if width > 0 and height > 0 else None)


def _voc_files(path: Path, wanted: Optional[set]) -> Iterator[Tuple[str, bytes, str]]:
    """(stem, XML bytes, description) of each wanted ``.xml`` in a folder (recursive) or a tar archive."""
    if path.is_dir():
        for file in sorted(path.rglob("*.xml")):
            if wanted is None or file.stem in wanted:
                yield file.stem, file.read_bytes(), str(file)
        return
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                stem = Path(member.name).stem
                if member.isfile() and member.name.endswith(".xml") and (wanted is None or stem in wanted):
                    yield stem, archive.extractfile(member).read(), f"{path}:{member.name}"
    except (tarfile.TarError, OSError) as err:
        raise HpxError(f"cannot read the box archive {path} ({err})") from None


def _csv_boxes(path: Path, wanted: Optional[set]) -> Dict[str, ImageBoxes]:
    """The boxes of a CSV ``filename,xmin,ymin,xmax,ymax`` by file-name stem."""
    rows: Dict[str, List[List[float]]] = {}
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or (line == 1 and [c.strip().lower() for c in row] == list(BOX_COLUMNS)):
                continue
            try:
                if len(row) != 5:
                    raise ValueError
                name, corners = row[0].strip(), [float(value) for value in row[1:]]
            except ValueError:
                raise HpxError(f"{path}:{line}: expected {','.join(BOX_COLUMNS)}, got {','.join(row)!r}") from None
            stem = Path(name).stem
            if wanted is None or stem in wanted:
                rows.setdefault(stem, []).append(corners)
    return {stem: ImageBoxes(_checked(np.array(corners), f"{path} ({stem})")) for stem, corners in rows.items()}


def read_boxes(path: Path | str, names: Optional[Iterable[str]] = None) -> Dict[str, ImageBoxes]:
    """The boxes of a box file (module docstring) by image file-name stem; ``names``: read only these images
    (names or stems; the rest of a 50,000-file archive is skipped unparsed)."""
    path = Path(path)
    if not path.exists():
        raise HpxError(f"box file not found: {path}")
    wanted = None if names is None else {Path(name).stem for name in names}
    if path.suffix.lower() == ".csv":
        return _csv_boxes(path, wanted)
    if not path.is_dir() and not path.name.lower().endswith(TAR_SUFFIXES):
        raise HpxError(f"boxes must be a CSV (filename,xmin,ymin,xmax,ymax), a folder of VOC .xml files or their "
                       f".tgz; got {path}")
    found = {stem: parse_voc(text, where) for stem, text, where in _voc_files(path, wanted)}
    if not found and names is None:
        raise HpxError(f"no .xml box files in {path}")
    return found


def image_size(source: ImageSource) -> Tuple[int, int]:
    """(width, height) of an image source, read from the file header (no decoding) or the array."""
    if source.array is not None:
        return source.array.shape[1], source.array.shape[0]
    try:
        with Image.open(source.path) as image:
            return image.size
    except OSError as err:
        raise HpxError(f"cannot read the size of {source.path} ({err})") from None


def _resized(step: Callable, size: Tuple[int, int]) -> Tuple[int, int]:
    """(width, height) that a resize step gives an image of ``size`` (width, height): the step itself, on a blank
    image, so its own rounding holds."""
    return step(Image.new("L", size)).size


def _crop_shift(crop: Sequence[int], size: Tuple[int, int]) -> Tuple[int, int]:
    """(dx, dy) added to coordinates by torchvision's ``center_crop`` to ``crop`` (h, w) of an image of ``size``
    (width, height): the padding of a side shorter than the crop, less the crop offset."""
    (crop_h, crop_w), (width, height) = crop, size
    pad_left, pad_top = max(crop_w - width, 0) // 2, max(crop_h - height, 0) // 2
    left = int(round((max(width, crop_w) - crop_w) / 2.0))
    top = int(round((max(height, crop_h) - crop_h) / 2.0))
    return pad_left - left, pad_top - top


def transform_boxes(boxes: np.ndarray, size: Tuple[int, int], transform: Callable) -> np.ndarray:
    """``boxes`` (K, 4) of an image of ``size`` (width, height), mapped through ``transform`` (module docstring):
    (K', 4) in the output's pixel-edge coordinates, clipped to it, boxes holding no pixel centre dropped."""
    from timm.data.transforms import MaybePILToTensor, MaybeToTensor, ResizeKeepRatio
    from torchvision import transforms

    boxes = _checked(boxes, "box").copy()
    width, height = size
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, (transforms.Resize, ResizeKeepRatio)):
            new_w, new_h = _resized(step, (width, height))
            boxes *= [new_w / width, new_h / height, new_w / width, new_h / height]
            width, height = new_w, new_h
        elif isinstance(step, transforms.CenterCrop):
            dx, dy = _crop_shift(step.size, (width, height))
            boxes += [dx, dy, dx, dy]
            height, width = step.size
        elif not isinstance(step, (transforms.ToTensor, transforms.PILToTensor, transforms.Normalize,
                                   MaybeToTensor, MaybePILToTensor)):
            raise HpxError(f"boxes cannot follow the transform step {type(step).__name__}; use timm's eval transform "
                           "(resize and centre crop)")
    boxes = np.clip(boxes, 0, [width, height, width, height])
    # a box holds a pixel centre when some c + 0.5 lies in [xmin, xmax) and some r + 0.5 in [ymin, ymax)
    holds = (np.ceil(boxes[:, 2] - 0.5) > np.ceil(boxes[:, 0] - 0.5)) & \
            (np.ceil(boxes[:, 3] - 0.5) > np.ceil(boxes[:, 1] - 0.5))
    return boxes[holds]


def box_mask(boxes: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) of the pixels whose centre lies in any of ``boxes`` (K, 4) (pixel-edge coordinates)."""
    rows, columns = np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5
    mask = np.zeros(shape, dtype=bool)
    for xmin, ymin, xmax, ymax in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask |= ((rows >= ymin) & (rows < ymax))[:, None] & ((columns >= xmin) & (columns < xmax))[None, :]
    return mask


def boxes_for_images(boxes: Dict[str, ImageBoxes], sources: Sequence[ImageSource],
                     transform: Callable) -> List[Optional[np.ndarray]]:
    """Per image source, its boxes (K, 4) through ``transform`` (:func:`transform_boxes`; K may be 0 when every box
    lies outside the crop), or None when the box file has no entry for it. A file that states another image size
    than the image has is refused."""
    mapped: List[Optional[np.ndarray]] = []
    for source in sources:
        entry = boxes.get(Path(source.name).stem)
        if entry is None:
            mapped.append(None)
            continue
        size = image_size(source)
        if entry.size is not None and entry.size != size:
            raise HpxError(f"the boxes of {source.name} are for a {entry.size[0]} x {entry.size[1]} image, but it is "
                           f"{size[0]} x {size[1]}")
        mapped.append(transform_boxes(entry.boxes, size, transform))
    return mapped


__all__ = ["BOX_COLUMNS", "ImageBoxes", "parse_voc", "read_boxes", "image_size", "transform_boxes", "box_mask",
           "boxes_for_images"]
