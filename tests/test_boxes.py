"""Object boxes: reading VOC XMLs (folder, .tgz) and CSVs, and their geometry through the evaluation transform,
checked against the transform applied to images with the boxes painted in."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from hpx_analysis.boxes import ImageBoxes, box_mask, boxes_for_images, read_boxes, transform_boxes
from hpx_analysis.errors import HpxError
from hpx_analysis.images import ImageSource

VOC = """<annotation><folder>val</folder><filename>{stem}</filename>
<size><width>{width}</width><height>{height}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJECT = "<object><name>n01751748</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>" \
         "</bndbox></object>"


def voc(stem: str, size: tuple, *boxes: tuple) -> str:
    return VOC.format(stem=stem, width=size[0], height=size[1], objects="".join(OBJECT.format(*b) for b in boxes))


def painted(size: tuple, boxes: np.ndarray) -> Image.Image:
    """A black RGB image of ``size`` (width, height) with ``boxes`` (pixel-edge, whole numbers) white."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for xmin, ymin, xmax, ymax in boxes.astype(int):
        pixels[ymin:ymax, xmin:xmax] = 255
    return Image.fromarray(pixels)


def white(transformed: torch.Tensor) -> np.ndarray:
    """Pixels of a normalised transform output (3, H, W) that are brighter than mid-grey."""
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    return ((transformed * std[:, None, None] + mean[:, None, None]).mean(0) > 0.5).numpy()


def test_a_non_square_image_through_resize_and_crop_pixel_exactly() -> None:
    """232 x 146 image, 64 px at crop_pct 0.875: the shorter side goes to floor(64 / 0.875) = 73 (a factor 0.5
    exactly, so nearest resampling keeps even box edges), the longer to 116; the crop starts at column 26 and at
    row round(4.5) = 4 (Python rounds halves to even). A box across the right crop edge is clipped, one across the
    top edge too, one in the cut-off left margin is dropped; the mask equals the transformed image's white pixels."""
    size = (232, 146)
    boxes = np.array([[150, 40, 200, 80],   # columns 75-100 after the resize: across the crop's right edge (90)
                      [60, 0, 100, 20],     # rows 0-10: across the top edge (row 4)
                      [0, 60, 40, 100]])    # columns 0-20: inside the cut-off left margin (0-26)
    transform = create_transform(input_size=(3, 64, 64), crop_pct=0.875, interpolation="nearest")
    mapped = transform_boxes(boxes, size, transform)
    np.testing.assert_array_equal(mapped, [[75 - 26, 20 - 4, 64, 40 - 4], [30 - 26, 0, 50 - 26, 10 - 4]])
    np.testing.assert_array_equal(box_mask(mapped, (64, 64)), white(transform(painted(size, boxes))))


def test_bicubic_resize_rounds_the_longer_side_down_and_the_mask_follows_the_image() -> None:
    """160 x 100 to 73: the longer side int(73 * 160 / 100) = 116 (116.8 rounded down), the scale 73 / 100 and
    116 / 160; bicubic blurs the edges, so the mask and the painted box agree to one pixel at the edges."""
    size = (160, 100)
    boxes = np.array([[100.0, 30.0, 150.0, 70.0]])
    transform = create_transform(input_size=(3, 64, 64), crop_pct=0.875, interpolation="bicubic")
    mapped = transform_boxes(boxes, size, transform)
    np.testing.assert_allclose(mapped, [[100 * 116 / 160 - 26, 30 * 73 / 100 - 4, 64, 70 * 73 / 100 - 4]])
    mask, image = box_mask(mapped, (64, 64)), white(transform(painted(size, boxes)))
    rows, columns = np.nonzero(mask)
    white_rows, white_columns = np.nonzero(image)
    for ours, theirs in ((rows, white_rows), (columns, white_columns)):
        assert abs(ours.min() - theirs.min()) <= 1 and abs(ours.max() - theirs.max()) <= 1
    assert (mask != image).sum() <= 2 * (mask.sum(0).max() + mask.sum(1).max())  # differences only along edges


def test_squash_resize_and_a_crop_larger_than_the_image() -> None:
    squash = create_transform(input_size=(3, 32, 48), crop_pct=1.0, crop_mode="squash", interpolation="bilinear")
    np.testing.assert_allclose(transform_boxes(np.array([[10.0, 10, 50, 40]]), (100, 80), squash),
                               [[4.8, 4, 24, 16]])
    from torchvision import transforms
    padded = transforms.Compose([transforms.CenterCrop(20)])  # a 16 x 10 image padded by 2 and 5 pixels
    np.testing.assert_allclose(transform_boxes(np.array([[0.0, 0, 16, 10]]), (16, 10), padded), [[2, 5, 18, 15]])
    with pytest.raises(HpxError, match="cannot follow the transform step RandomHorizontalFlip"):
        transform_boxes(np.array([[0.0, 0, 1, 1]]), (4, 4), transforms.Compose([transforms.RandomHorizontalFlip()]))


def test_a_box_between_pixel_centres_is_dropped() -> None:
    identity = create_transform(input_size=(3, 10, 10), crop_pct=1.0, interpolation="nearest")
    assert transform_boxes(np.array([[3.6, 2.0, 4.4, 8.0]]), (10, 10), identity).shape == (0, 4)
    assert transform_boxes(np.array([[3.4, 2.0, 4.4, 8.0]]), (10, 10), identity).shape == (1, 4)  # holds 3.5


def test_read_voc_folder_tgz_and_csv(tmp_path: Path) -> None:
    xmls = {"ILSVRC2012_val_00000001": voc("ILSVRC2012_val_00000001", (500, 375), (111, 108, 441, 375)),
            "ILSVRC2012_val_00000002": voc("ILSVRC2012_val_00000002", (500, 333), (0, 0, 100, 50), (10, 20, 30, 40))}
    folder = tmp_path / "val"
    folder.mkdir()
    archive = tmp_path / "ILSVRC2012_bbox_val_v3.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for stem, text in xmls.items():
            (folder / f"{stem}.xml").write_text(text)
            info = tarfile.TarInfo(f"val/{stem}.xml")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    for path in (folder, archive):
        boxes = read_boxes(path)
        assert sorted(boxes) == sorted(xmls)
        np.testing.assert_array_equal(boxes["ILSVRC2012_val_00000002"].boxes, [[0, 0, 100, 50], [10, 20, 30, 40]])
        assert boxes["ILSVRC2012_val_00000001"].size == (500, 375)
        only = read_boxes(path, names=["n01751748/ILSVRC2012_val_00000001.JPEG"])
        assert list(only) == ["ILSVRC2012_val_00000001"]
    (tmp_path / "boxes.csv").write_text("filename,xmin,ymin,xmax,ymax\na.jpg,1,2,3,4\nsub/a.jpg,5,6,7,8\nb,0,0,9,9\n")
    boxes = read_boxes(tmp_path / "boxes.csv")
    np.testing.assert_array_equal(boxes["a"].boxes, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert boxes["b"].size is None


@pytest.mark.parametrize("name, text, message", [
    ("bad.csv", "a.jpg,1,2,3\n", r"bad.csv:1: expected filename,xmin,ymin,xmax,ymax"),
    ("flat.csv", "a.jpg,5,2,5,4\n", "needs xmin < xmax"),
    ("word.csv", "a.jpg,1,2,x,4\n", r"word.csv:1: expected"),
    ("boxes.txt", "", "boxes must be a CSV"),
])
def test_bad_box_files_are_one_line_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(HpxError, match=message):
        read_boxes(tmp_path / name)


def test_bad_xml_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "a.xml").write_text("<annotation><object><bndbox><xmin>1</xmin></bndbox></object>")
    with pytest.raises(HpxError, match="not a Pascal VOC XML"):
        read_boxes(tmp_path / "xml")
    (tmp_path / "xml" / "a.xml").write_text(voc("a", (10, 10), (1, 2, "x", 4)))
    with pytest.raises(HpxError, match="numeric xmin"):
        read_boxes(tmp_path / "xml")
    with pytest.raises(HpxError, match="box file not found"):
        read_boxes(tmp_path / "none.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HpxError, match="no .xml box files"):
        read_boxes(tmp_path / "empty")


def test_boxes_follow_each_image_and_a_wrong_size_is_refused() -> None:
    transform = create_transform(input_size=(3, 64, 64), crop_pct=1.0, interpolation="bilinear")
    sources = [ImageSource("wide", array=np.zeros((64, 128, 3), np.uint8)),
               ImageSource("n1/tall.png", array=np.zeros((128, 64, 3), np.uint8)),
               ImageSource("none", array=np.zeros((64, 64, 3), np.uint8))]
    boxes = {"wide": ImageBoxes(np.array([[32.0, 0, 96, 64], [0, 0, 20, 20]]), (128, 64)),
             "tall": ImageBoxes(np.array([[0.0, 32, 64, 64]]))}
    mapped = boxes_for_images(boxes, sources, transform)
    np.testing.assert_array_equal(mapped[0], [[0, 0, 64, 64]])  # the second box lies in the cut-off margin
    np.testing.assert_array_equal(mapped[1], [[0, 0, 64, 32]])
    assert mapped[2] is None
    with pytest.raises(HpxError, match="boxes of wide are for a 100 x 64 image, but it is 128 x 64"):
        boxes_for_images({"wide": ImageBoxes(np.array([[0.0, 0, 1, 1]]), (100, 64))}, sources, transform)
