"""The shared input pipeline (images.eval_transform): crop and no-crop modes on a non-square photograph,
checked pixel for pixel against the documented recipes (PIL resize, /255, normalise) and timm's own transform."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hpx_analysis.analyzers.erf import REPLKNET_SIZE, _input_transform
from hpx_analysis.images import eval_transform, read_rgb, sample_images

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class _Configured(nn.Module):
    """A model carrying only a timm pretrained config."""

    def __init__(self, **cfg) -> None:
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, 48, 48), "crop_pct": 0.875, "interpolation": "bicubic",
                               "mean": MEAN, "std": STD, **cfg}


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    """scikit-image's cat, 451 wide x 300 high."""
    image = read_rgb(next(s for s in sample_images() if s.name == "chelsea"))
    assert image.size == (451, 300)
    return image


def _recipe(image: Image.Image, size_wh: Tuple[int, int], resample: int, mean: Sequence[float],
            std: Sequence[float], box: Tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """PIL resize to ``size_wh`` (W, H), optional crop ``box``, then /255 and per-channel (x - mean) / std."""
    resized = image.resize(size_wh, resample)
    if box is not None:
        resized = resized.crop(box)
    rgb = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (rgb - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_crop_mode_resizes_the_shorter_side_and_centre_crops(chelsea) -> None:
    from timm.data import create_transform, resolve_model_data_config

    model = _Configured()
    transform, size = eval_transform(model, crop=True)
    got = transform(chelsea)
    assert size == (48, 48) and got.shape == (3, 48, 48) and got.dtype == torch.float32
    # shorter side 300 -> floor(48 / 0.875) = 54, longer int(54 * 451 / 300) = 81; crop rows 3..51, columns 16..64
    assert torch.equal(got, _recipe(chelsea, (81, 54), Image.BICUBIC, MEAN, STD, box=(16, 3, 64, 51)))
    assert torch.equal(got, create_transform(**resolve_model_data_config(model), is_training=False)(chelsea))
    override, size = eval_transform(model, 40)  # 40 / 0.875 = 45.7 -> 45 x int(45 * 451 / 300) = 67
    assert size == (40, 40)
    assert torch.equal(override(chelsea), _recipe(chelsea, (67, 45), Image.BICUBIC, MEAN, STD, box=(14, 2, 54, 42)))


@pytest.mark.parametrize("interpolation,resample", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_no_crop_mode_resizes_to_exactly_the_input_size(chelsea, interpolation, resample) -> None:
    model = _Configured(interpolation=interpolation, input_size=(3, 32, 56))
    transform, size = eval_transform(model, crop=False)
    assert size == (32, 56)
    assert torch.equal(transform(chelsea), _recipe(chelsea, (56, 32), resample, MEAN, STD))
    square, size = eval_transform(model, 40, crop=False)
    assert size == (40, 40)
    assert torch.equal(square(chelsea), _recipe(chelsea, (40, 40), resample, MEAN, STD))


def test_interpolation_overrides_the_config(chelsea) -> None:
    model = _Configured(interpolation="bilinear")
    transform, _ = eval_transform(model, 40, crop=False, interpolation="bicubic")
    assert torch.equal(transform(chelsea), _recipe(chelsea, (40, 40), Image.BICUBIC, MEAN, STD))
    cropped, _ = eval_transform(model, interpolation="bicubic")
    assert torch.equal(cropped(chelsea), _recipe(chelsea, (81, 54), Image.BICUBIC, MEAN, STD, box=(16, 3, 64, 51)))


def test_replknet_inputs_are_the_bicubic_1024_px_resize(chelsea) -> None:
    """The ERF replknet convention: bicubic resize to 1024 px squared, no crop, the model's mean/std, even
    for a model whose config interpolates bilinearly (the demo proxies); a model without a config
    gets the ImageNet defaults."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    for model, mean, std in ((_Configured(interpolation="bilinear"), MEAN, STD),
                             (nn.Conv2d(3, 1, 1), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)):
        transform, size, description = _input_transform(model, "replknet", None)
        assert size == (REPLKNET_SIZE, REPLKNET_SIZE) and "no crop" in description
        expected = _recipe(chelsea, (REPLKNET_SIZE, REPLKNET_SIZE), Image.BICUBIC, mean, std)
        assert torch.equal(transform(chelsea), expected)
