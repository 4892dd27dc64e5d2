"""Image inputs shared by the analyzers: discovery, deterministic selection, reading, preprocessing.

Without a folder the analyzers use the sample photographs bundled with scikit-image, so every
command runs offline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import HpxError

T = TypeVar("T")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".jpe")
# colour photographs shipped with scikit-image (no download needed)
SKIMAGE_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "retina", "hubble_deep_field")


@dataclass
class ImageSource:
    """A named image: a file path, or an in-memory RGB uint8 array (H, W, 3) for bundled samples."""

    name: str
    path: Optional[Path] = None
    array: Optional[np.ndarray] = field(default=None, repr=False)


ImageLike = Union[ImageSource, Path, str, Image.Image, np.ndarray]
"""What the analyzers take as one image: an :class:`ImageSource`, a file path (``Path`` or text), a PIL image or an
array (H, W) or (H, W, 3|4), uint8 or float in [0, 1]."""


def as_image_source(image: ImageLike, index: int = 0) -> ImageSource:
    """One :class:`ImageSource` from any :data:`ImageLike`; in-memory images are named ``image[index]``."""
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        return ImageSource(name=path.name, path=path)
    if isinstance(image, Image.Image):
        return ImageSource(name=f"image[{index}]", array=np.asarray(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise HpxError(f"image[{index}]: an array image must be (H, W) or (H, W, 3), got shape {image.shape}")
        pixels = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]
        return ImageSource(name=f"image[{index}]", array=np.ascontiguousarray(pixels))
    raise HpxError(f"image[{index}]: cannot read a {type(image).__name__} as an image; give a path, a PIL image, an "
                   "array (H, W, 3) or an ImageSource")


def as_image_sources(images: Sequence[ImageLike]) -> List[ImageSource]:
    """:func:`as_image_source` of each image, in order."""
    return [as_image_source(image, index) for index, image in enumerate(images)]


def list_images(folder: Path | str) -> List[Path]:
    """Every image file under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HpxError(f"{folder} is a file; give the folder that holds the images" if folder.is_file()
                       else f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def select_images(paths: Sequence[Path], count: Optional[int], seed: int, root: Path | str) -> List[Path]:
    """A deterministic subset of ``count`` images (all when None or larger than available).

    With class subfolders (an ImageFolder tree such as ImageNet val) images are taken round-robin
    over the sorted classes, each class's files shuffled with ``seed``, so the subset spreads over
    classes; a flat folder gives a seeded sample. The result is sorted by path.
    """
    paths = sorted(paths)
    if count is None or count >= len(paths):
        return paths
    root = Path(root)
    groups: Dict[str, List[Path]] = {}
    for path in paths:
        relative = path.relative_to(root)
        groups.setdefault(relative.parts[0] if len(relative.parts) > 1 else "", []).append(path)
    return sorted(round_robin_sample(groups, count, seed))


def round_robin_sample(groups: Mapping[Any, Sequence[T]], count: int, seed: int) -> List[T]:
    """``count`` items taken round-robin over the sorted group keys, each group shuffled with ``seed``."""
    rng = random.Random(seed)
    queues = []
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        queues.append(members)
    chosen: List[T] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen


def sample_images(count: Optional[int] = None) -> List[ImageSource]:
    """scikit-image's bundled colour photographs (offline default input), in a fixed order."""
    import skimage.data

    sources = []
    for name in SKIMAGE_SAMPLES:
        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        sources.append(ImageSource(name=name, array=array[..., :3].astype(np.uint8)))
    return sources[:count] if count is not None else sources


def image_sources(folder: Optional[Path | str], count: Optional[int], seed: int) -> List[ImageSource]:
    """Images of ``folder`` selected with :func:`select_images`, or the bundled samples without a folder."""
    if folder is None:
        return sample_images(count)
    paths = list_images(folder)
    if not paths:
        raise HpxError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return [ImageSource(name=str(p.relative_to(folder)), path=p) for p in select_images(paths, count, seed, folder)]


def read_rgb(source: ImageSource) -> Optional[Image.Image]:
    """The image as RGB PIL image, or None when the file is unreadable or corrupt."""
    if source.array is not None:
        return Image.fromarray(source.array).convert("RGB")
    try:
        with Image.open(source.path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def skipped_line(names: Sequence[str], shown: int = 5) -> str:
    """One line on unreadable images left out: their count and the first ``shown`` names."""
    return f"skipped {len(names)} unreadable image(s): {', '.join(names[:shown])}{' ...' if len(names) > shown else ''}"


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """RGB in [0, 1], (3, H, W) or (N, 3, H, W), to model input with per-channel ``mean``/``std``."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean_t) / std_t


def eval_transform(model: torch.nn.Module, input_size: Optional[int] = None, *, crop: bool = True,
                   interpolation: Optional[str] = None) -> Tuple[Callable[[Image.Image], Tensor], Tuple[int, int]]:
    """The model's evaluation preprocessing, RGB PIL image -> normalised (3, H, W) float32, and that (H, W).

    Built by timm from the model's data config (``resolve_data_config`` + ``create_transform``):
    the config's input size (``input_size`` overrides it with a square side), interpolation
    (``interpolation``, e.g. ``"bicubic"``, overrides it), mean and std. crop=True: timm's eval
    transform, resize the shorter side to size / crop_pct and centre crop. crop=False: resize to
    exactly (H, W), aspect ratio not kept, nothing cropped (timm's ``squash`` mode at crop_pct 1).
    """
    from timm.data import create_transform, resolve_data_config

    args = {"input_size": (3, input_size, input_size)} if input_size else {}
    config = resolve_data_config(args, model=model)
    if interpolation is not None:
        config["interpolation"] = interpolation
    if not crop:
        config.update(crop_mode="squash", crop_pct=1.0)
    return create_transform(**config), (int(config["input_size"][1]), int(config["input_size"][2]))


def model_mean_std(model: torch.nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalisation of the model's pretrained config (ImageNet defaults when it has none)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
