"""Window truncation (issue 5): masks, equivalences with independently built models, the sweep vs. a
naive loop, resuming, data sets, the CLI and a 2-process torchrun run, on tiny models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hpx_analysis.analyzers import truncation as trunc
from hpx_analysis.analyzers.kernels import wrap_taps
from hpx_analysis.analyzers.truncation import TruncationResult, default_sizes, truncation_sweep
from hpx_analysis.datasets import labelled_images, stratified_subset
from hpx_analysis.errors import HpxError
from hpx_analysis.images import eval_transform
from hpx_analysis.inspection import kernel, long_filter_layers
from hpx_analysis.interventions import kept_taps, relative_tap_distance, truncate_kernels
from hpx_analysis.statistics import bootstrap_ci
from hpx_analysis.models.zoo import load_model

from .conftest import one_process, random_image_folder, torchrun

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from more, and oversubscribed shared cores stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tiny_config, tiny_weights):
    return lambda name: load_model(tiny_config(name), tiny_weights(name))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """ImageFolder tree: 3 classes x 2 random images (odd sizes), plus one corrupt file in class b."""
    root = random_image_folder(tmp_path_factory.mktemp("data") / "val", ("a", "b", "c"))
    (root / "b" / "corrupt.png").write_bytes(b"\x89PNG not really")
    return root


def _batch(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_relative_distance_analytic(tiny):
    """Kernel 3 on the 2x2 map of stage 4: offsets are 0 or 1 pixel, half the map is 1 pixel."""
    info = [i for i in long_filter_layers(tiny("tiny_hpx"), SIZE) if i.stage == 3][0]
    assert info.feature_size == (2, 2)
    disc, square = relative_tap_distance(info, "disc"), relative_tap_distance(info, "square")
    expected = torch.tensor([[2 ** 0.5, 1, 2 ** 0.5], [1, 0, 1], [2 ** 0.5, 1, 2 ** 0.5]], dtype=torch.float64)
    assert torch.allclose(disc, expected)
    assert torch.equal(square, torch.tensor([[1.0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.float64))
    hyena = [i for i in long_filter_layers(tiny("tiny_hb"), SIZE) if i.stage == 3][0]  # L = 4, taps 7
    offset = relative_tap_distance(hyena, hb_cut="offset")
    assert torch.allclose(offset, torch.tensor([3, 2, 1, 0, 1, 2, 3], dtype=torch.float64) / 2)
    # nearest wrap on rows of 2: offsets -3..3 -> (-1,-1) (-1,0) (0,-1) (0,0) (0,1) (1,0) (1,1), the 3x3 kernel
    assert torch.allclose(relative_tap_distance(hyena), expected[[0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 1, 2]])
    assert torch.equal(relative_tap_distance(hyena, "square"), torch.tensor([1.0, 1, 1, 0, 1, 1, 1],
                                                                            dtype=torch.float64))
    with pytest.raises(HpxError, match="no square"):
        relative_tap_distance(hyena, "square", hb_cut="offset")
    with pytest.raises(HpxError, match="unknown Hyena 1D cut"):
        relative_tap_distance(hyena, hb_cut="rows")


def _kept_pixels(kept: np.ndarray, centre: int, feature_size, position) -> set:
    """Image pixels (row, col) that the kept taps of a 1D filter weight at ``position`` (via wrap_taps)."""
    wrapped = wrap_taps(kept.astype(np.float64), centre, feature_size, position)
    rows, cols = np.nonzero((wrapped.values == 1) & ~wrapped.outside)
    return set(zip((rows + wrapped.first_row).tolist(), cols.tolist()))


@pytest.mark.parametrize("size", [0.25, 0.5, 0.9])
def test_wrap_mask_is_the_2d_disc_away_from_the_side_edges(tiny, size):
    """Stage 1 of tiny_hb (16 x 16 map, 511 taps): at pixels at least r F / 2 (in whole pixels) from the
    left and right edges the wrap mask weights exactly the pixels of the 2D disc of relative size r
    (same count, same pixels); one pixel nearer the left edge some of its taps wrap to the row above,
    and the offset cut keeps more taps (full rows)."""
    info = [i for i in long_filter_layers(tiny("tiny_hb"), SIZE) if i.stage == 0][0]
    (height, width), centre = info.feature_size, info.long_filter.centre[0]
    kept = kept_taps(relative_tap_distance(info), size).numpy()
    half = int(size * width / 2)  # whole pixels

    def disc(row: int, col: int) -> set:
        return {(y, x) for y in range(height) for x in range(width)
                if np.hypot((y - row) / (height / 2), (x - col) / (width / 2)) <= size + 1e-9}

    for position in [(8, 8), (2, 7), (15, half), (0, width - 1 - half)]:
        pixels = _kept_pixels(kept, centre, info.feature_size, position)
        assert pixels == disc(*position), position
    offset = kept_taps(relative_tap_distance(info, hb_cut="offset"), size).numpy()
    assert len(_kept_pixels(offset, centre, info.feature_size, (8, 8))) > len(disc(8, 8))
    assert _kept_pixels(kept, centre, info.feature_size, (8, half - 1)) != disc(8, half - 1)


@pytest.mark.parametrize("name", ["tiny_hpx", "tiny_hb"])
def test_large_size_unchanged_and_restored(tiny, name):
    model, x = tiny(name), _batch()
    with torch.no_grad():
        before = model(x)
        with truncate_kernels(model, [0, 1, 2, 3], 100.0, input_size=SIZE):
            full = model(x)
        with truncate_kernels(model, [0, 1, 2, 3], 0.3, input_size=SIZE):
            cut = model(x)
        after = model(x)
    assert torch.equal(full, before)
    assert not torch.allclose(cut, before)
    assert torch.equal(after, before)


@pytest.mark.parametrize("name,stage", [("tiny_hpx", 1), ("tiny_hb", 2)])
def test_zero_size_is_centre_tap_plus_skip(tiny, monkeypatch, name, stage):
    """r = 0 equals a model whose long filters of that stage are ``u * (K_centre + bias)``."""
    truncated, independent, x = tiny(name), tiny(name), _batch(1)
    for info in long_filter_layers(independent):
        if info.stage != stage:
            continue
        filt = info.long_filter
        centre = kernel(filt)[(slice(None), *filt.centre)]  # (C,) the centre tap of the learned kernel
        gain = (centre + filt.bias.flatten()).detach()
        shape = (1, -1, 1, 1) if filt.bias.dim() == 4 else (1, -1, 1)
        monkeypatch.setattr(filt, "forward", lambda u, g=gain.view(shape): u * g)
    with torch.no_grad(), truncate_kernels(truncated, [stage], 0.0, input_size=SIZE):
        got = truncated(x)
    with torch.no_grad():
        expected, original = independent(x), tiny(name)(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, original, atol=1e-3)


def _naive_counts(model, data: Path, sizes, stages, shape, batch_size, hb_cut="wrap"):
    """Correct top-1 counts with a full forward per (stage, size): column 0 untruncated, then stage-major."""
    from hpx_analysis.engine import ImageDataset, collate_skipping
    from hpx_analysis.images import ImageSource
    transform, _ = eval_transform(model, SIZE)
    samples = labelled_images(data)
    dataset = ImageDataset([ImageSource(s.name, s.path) for s in samples], transform, [s.label for s in samples])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping)
    counts = np.zeros(1 + len(stages) * len(sizes), dtype=int)
    with torch.no_grad():
        for batch in loader:
            counts[0] += int((model(batch.images).argmax(1) == batch.labels).sum())
            for i, stage in enumerate(stages):
                for j, size in enumerate(sizes):
                    with truncate_kernels(model, [stage], size, shape, input_size=SIZE, hb_cut=hb_cut):
                        hits = model(batch.images).argmax(1) == batch.labels
                    counts[1 + i * len(sizes) + j] += int(hits.sum())
    return counts


@pytest.mark.parametrize("name,shape,hb_cut", [("tiny_hpx", "square", "wrap"), ("tiny_hyena_causal", "disc", "offset"),
                                               ("tiny_hb", "square", "wrap")])
def test_sweep_matches_naive_loop(tiny, image_folder, name, shape, hb_cut):
    model, sizes, x = tiny(name), [0.0, 0.2, 50.0], _batch(2)
    with torch.no_grad():
        before = model(x)
    result = truncation_sweep(model, labelled_images(image_folder), [0, 3], sizes, shape, hb_cut=hb_cut, batch_size=4,
                              input_size=SIZE, n_resamples=200, progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the sweep leaves the model computing exactly what it did
    assert result.meta["hb_cut"] == hb_cut
    # the coverage line is drawn where coverage is an r of the cut: 2D layers (bidirectional 1D ones cut by
    # offset are checked in the CLI test), not 1D ones under the wrap cut nor causal ones under the offset cut
    assert np.isfinite(result.arrays["coverage"]).tolist() == [name == "tiny_hpx"] * 2
    naive = _naive_counts(model, image_folder, sizes, [0, 3], shape, 4, hb_cut)
    assert np.array_equal(result.arrays["top1_correct"], naive)
    assert result.meta["images_evaluated"] == 6 and result.meta["skipped"] == ["b/corrupt.png"]
    assert result.arrays["top1"][:, -1].tolist() == [result.arrays["reference"][0]] * 2  # r = 50 keeps all
    assert np.all(np.diff(result.arrays["kept_fraction"], axis=1) >= 0)
    assert result.arrays["kept_fraction"][:, -1].tolist() == [1.0, 1.0]
    # stage 4 of the tiny model (2x2 map) has few taps, so several sizes share one set of kept taps
    assert result.meta["distinct_truncations"]["S4"] < len(sizes)
    ci = result.arrays["top1_ci"]
    assert np.all(ci[..., 0] <= result.arrays["top1"] + 1e-12) and np.all(result.arrays["top1"] <= ci[..., 1] + 1e-12)


def test_default_sizes_end_where_every_tap_is_kept(tiny, image_folder):
    """tiny_hpx at 64 px: kernels 31, 15, 7, 3 on maps of 16, 8, 4, 2, so the corner taps lie at
    15 sqrt(2) / 8, 7 sqrt(2) / 4, 3 sqrt(2) / 2 and sqrt(2) half maps; tiny_hb's stage 4 (2 x 2 map,
    offsets -3..3) reaches sqrt(2) with the wrap mask and 3 / 2 with the offset cut."""
    grid = [round(0.1 * i, 1) for i in range(27)]
    hpx, hb = tiny("tiny_hpx"), tiny("tiny_hb")
    assert default_sizes(hpx, input_size=SIZE) == pytest.approx(grid + [15 * 2 ** 0.5 / 8])
    assert default_sizes(hpx, [1, 2], input_size=SIZE) == pytest.approx(grid[:25] + [7 * 2 ** 0.5 / 4])
    assert default_sizes(hpx, [3], input_size=SIZE) == pytest.approx(grid[:15] + [2 ** 0.5])
    assert default_sizes(hb, [3], input_size=SIZE) == pytest.approx(grid[:15] + [2 ** 0.5])
    assert default_sizes(hb, [3], hb_cut="offset", input_size=SIZE) == pytest.approx(grid[:16])
    result = truncation_sweep(hpx, labelled_images(image_folder), [2, 3], input_size=SIZE, n_resamples=50,
                              progress=False)
    assert result.arrays["sizes"] == pytest.approx(grid[:22] + [3 * 2 ** 0.5 / 2])
    assert result.meta["every_tap_size"] == pytest.approx({"S3": 3 * 2 ** 0.5 / 2, "S4": 2 ** 0.5})
    assert result.arrays["kept_fraction"][:, -1].tolist() == [1.0, 1.0]
    assert result.arrays["kept_fraction"][0, -2] < 1.0  # 2.1 drops stage 3's corners
    assert result.arrays["top1"][:, -1].tolist() == [result.arrays["reference"][0]] * 2


def test_bootstrap_interval_matches_normal_approximation():
    flags = np.zeros((2, 400))
    flags[0, :200] = 1
    flags[1] = 1
    ci = bootstrap_ci(flags, 2000, seed=0)
    half_width = 1.96 * np.sqrt(0.25 / 400)
    assert np.allclose(ci[0], [0.5 - half_width, 0.5 + half_width], atol=0.012)
    assert ci[1].tolist() == [1.0, 1.0]


def test_interrupted_run_resumes(tiny, image_folder, tmp_path, monkeypatch):
    args = dict(stages=[3], sizes=[0.0, 1.0], batch_size=3, input_size=SIZE, n_resamples=100, progress=False)
    samples = labelled_images(image_folder)
    uninterrupted = truncation_sweep(tiny("tiny_hpx"), samples, **args)
    original, calls = trunc._evaluate_batch, []

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(trunc, "_evaluate_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        truncation_sweep(tiny("tiny_hpx"), samples, resume_dir=tmp_path, **args)
    monkeypatch.setattr(trunc, "_evaluate_batch", original)
    resumed = truncation_sweep(tiny("tiny_hpx"), samples, resume_dir=tmp_path, **args)
    assert resumed.meta["options"]["batches_resumed"] == 2
    assert resumed.meta["options"]["batches_computed"] == resumed.meta["options"]["batches_total"] - 2
    for key in ("top1_correct", "top5_correct", "top1", "top1_ci"):
        assert np.array_equal(resumed.arrays[key], uninterrupted.arrays[key])
    assert resumed.meta["skipped"] == uninterrupted.meta["skipped"]


def test_datasets_folder_labels_and_limit(image_folder, tmp_path):
    tree = labelled_images(image_folder)
    assert {s.name.split("/")[0]: s.label for s in tree} == {"a": 0, "b": 1, "c": 2}
    flat = tmp_path / "flat"
    flat.mkdir()
    names = sorted(p.name for p in (image_folder / "a").glob("*.png"))
    for i, name in enumerate(names):
        shutil.copy(image_folder / "a" / name, flat / f"img{i}.png")
    (tmp_path / "labels.csv").write_text("filename,label\nimg1.png,3\nimg0.png,7\n")
    (tmp_path / "ground_truth.txt").write_text("5\n6\n")
    (tmp_path / "val.txt").write_text("img0.png 9\nimg1.png 8\n")
    from_csv = labelled_images(flat, tmp_path / "labels.csv")
    assert [(s.name, s.label) for s in from_csv] == [("img0.png", 7), ("img1.png", 3)]
    assert [s.label for s in labelled_images(flat, tmp_path / "ground_truth.txt")] == [5, 6]
    assert [s.label for s in labelled_images(flat, tmp_path / "val.txt")] == [9, 8]
    subset = stratified_subset(tree, 6, seed=1)
    assert sorted(s.label for s in subset) == [0, 0, 1, 1, 2, 2]
    assert subset == stratified_subset(tree, 6, seed=1) and len(stratified_subset(tree, 4, seed=0)) == 4
    draws = {tuple(s.name for s in stratified_subset(tree, 3, seed=seed)) for seed in range(8)}
    assert len(draws) > 1 and all(len({name.split("/")[0] for name in draw}) == 3 for draw in draws)
    with pytest.raises(HpxError, match="1 labels but"):
        (tmp_path / "short.txt").write_text("1\n")
        labelled_images(flat, tmp_path / "short.txt")


def _fake_devkit(folder: Path, wnids_of_images) -> Path:
    """A devkit data/ folder: meta.mat with the 1000 leaf synsets under shuffled devkit ids, one
    non-leaf synset, and the ground truth (devkit ids) of the given images."""
    from scipy.io import savemat
    from hpx_analysis.datasets import imagenet_wnid_index
    wnids = list(imagenet_wnid_index())
    order = np.random.default_rng(3).permutation(len(wnids))
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    synsets = np.array([(int(i) + 1, wnids[j], 0) for i, j in enumerate(order)] + [(1001, "n00001740", 5)],
                       dtype=dtype)
    data = folder / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    devkit_id = {wnids[j]: i + 1 for i, j in enumerate(order)}
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{devkit_id[w]}\n" for w in wnids_of_images))
    return data


def test_imagenet_label_formats(image_folder, tmp_path):
    """WordNet-id folders, wnid CSVs (Kaggle layout, names without suffix) and the devkit ground
    truth (ids through meta.mat, as a file, folder or tar.gz) all give timm's class indices."""
    import tarfile
    from hpx_analysis.datasets import imagenet_wnid_index
    index = imagenet_wnid_index()
    assert index["n01440764"] == 0 and index["n15075141"] == 999 and len(index) == 1000
    tree = tmp_path / "tree"
    for wnid in ("n04592741", "n01530575"):  # a subset of classes: indices are not 0, 1
        shutil.copytree(image_folder / "a", tree / wnid)
    assert {s.name.split("/")[0]: s.label for s in labelled_images(tree)} == {"n01530575": 10, "n04592741": 908}

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, source in enumerate(sorted((image_folder / "a").glob("*.png"))):
        shutil.copy(source, flat / f"ILSVRC2012_val_{i + 1:08d}.png")
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01530575 1 2 30 40 n01530575 5 6 7 8 \n"
                      "ILSVRC2012_val_00000001,n04592741 3 4 50 60 \n")
    expected = [("ILSVRC2012_val_00000001.png", 908), ("ILSVRC2012_val_00000002.png", 10)]
    assert [(s.name, s.label) for s in labelled_images(flat, kaggle)] == expected

    data = _fake_devkit(tmp_path / "devkit", ["n04592741", "n01530575"])
    truth = data / "ILSVRC2012_validation_ground_truth.txt"
    assert int(truth.read_text().split()[0]) - 1 != 908  # devkit ids are not timm indices
    archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data.parent, arcname="ILSVRC2012_devkit_t12")
    for labels in (truth, data.parent, archive):
        assert [(s.name, s.label) for s in labelled_images(flat, labels)] == expected

    (data / "meta.mat").unlink()
    with pytest.raises(HpxError, match="need the devkit's meta.mat"):
        labelled_images(flat, truth)
    (tmp_path / "bad.csv").write_text("ILSVRC2012_val_00000001.png,n99999999\n")
    with pytest.raises(HpxError, match="not an ImageNet-1k class"):
        labelled_images(flat, tmp_path / "bad.csv")
    (tmp_path / "words.csv").write_text("ILSVRC2012_val_00000001.png,cat\nILSVRC2012_val_00000002.png,dog\n")
    with pytest.raises(HpxError, match="class indices or ImageNet WordNet ids"):
        labelled_images(flat, tmp_path / "words.csv")


def test_bad_stage_and_classes(tiny, image_folder):
    samples = labelled_images(image_folder)
    with pytest.raises(HpxError, match="stage 5 does not exist"):
        truncation_sweep(tiny("tiny_hpx"), samples, [4], [0.0], input_size=SIZE)
    with pytest.raises(HpxError, match=r"S1 has no long filter \(its mixer is local_conv\); layers with one are "
                                       "in stages 3-4"):
        truncation_sweep(tiny("tiny_c_hpx"), samples, [0], [0.0], input_size=SIZE)
    with pytest.raises(HpxError, match="block 2 of stage 3 does not exist; stage 3 has blocks 1$"):
        truncation_sweep(tiny("tiny_hpx"), samples, ["S3B1-2"], [0.0], input_size=SIZE)
    with pytest.raises(HpxError, match=r"S2\+S3 spans several stages"):
        truncation_sweep(tiny("tiny_hpx"), samples, [[1, 2]], [0.0], input_size=SIZE)
    with pytest.raises(HpxError, match="no long filters"):
        truncation_sweep(tiny("tiny_hpx_sc"), samples, None, [0.0], input_size=SIZE)


def test_cli_end_to_end(tiny_config, tiny_weights, image_folder, tmp_path):
    from hpx_analysis_cli.app import app
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["truncate", "--model", tiny_config("tiny_hpx"), "--weights",
                                      tiny_weights("tiny_hpx"), "--data", str(image_folder), "--layers", "S2",
                                      "--layers", "4", "--sizes", "0:1:0.5", "--input-size", str(SIZE),
                                      "--limit", "6", "--batch-size", "3", "--bootstrap", "100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    stem = out / "truncate_tiny_hpx"
    for suffix in (".npz", ".json", ".csv", ".pdf", ".png"):
        assert stem.with_suffix(suffix).is_file()
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["stages_paper"] == [2, 4] and len(meta["inputs"]["images"]) == 6
    rows = list(csv.DictReader(open(stem.with_suffix(".csv"))))
    expected = [(s, r) for s in ("2", "4") for r in ("0.0", "0.5", "1.0")]
    assert [(r["stage"], r["relative_size"]) for r in rows] == expected
    loaded = TruncationResult.load(stem)
    assert loaded.arrays["top1"].shape == (2, 3) and (out / "truncate_tiny_hpx.figure.json").is_file()


def test_cli_layers_are_numbered_from_one_in_any_layer_form():
    """``--layers S2`` equals ``--layers 2`` (and ``stages.1``, numbered like the module); a block or a block range
    of one stage is a group of its own; repeated and comma-separated values are the same list."""
    from hpx_analysis.layer_names import LayerRef
    from hpx_analysis_cli.options import layer_groups, layer_texts

    def groups(*values: str):
        return layer_groups(layer_texts(list(values)))
    assert groups("S2") == groups("2") == groups("s2") == groups("stages.1") == [[LayerRef(1)]]
    assert groups("S2", "4") == groups("S2,4") == groups(" S2 , 4 ") == [[LayerRef(1)], [LayerRef(3)]]
    assert groups("all") is None and groups() is None
    blocks = [[LayerRef(0, b) for b in range(6)]]
    assert groups("S1B1-6") == groups("1.1-6") == groups("stages.0.blocks.0-5") == blocks
    assert groups("S3B2") == [[LayerRef(2, 1)]]
    for bad, message in (("S2-3", "must start at a block"), ("S1B4-2", "ends before it starts"),
                         ("0", "numbered from 1"), ("two", "names no stage")):
        with pytest.raises(HpxError, match=message):
            groups(bad)


def test_cli_default_sizes_and_hb_cut(tiny_config, tiny_weights, image_folder, tmp_path):
    """No --sizes: 0 to every tap kept; --hb-cut is recorded, the coverage line is drawn only where it
    is on the r axis (offset cut), and the offset cut has no square."""
    from hpx_analysis_cli.app import app
    args = ["truncate", "--model", tiny_config("tiny_hb"), "--weights", tiny_weights("tiny_hb"), "--data",
            str(image_folder), "--layers", "4", "--input-size", str(SIZE), "--bootstrap", "50", "--no-resume"]
    for cut, last in (("wrap", 2 ** 0.5), ("offset", 1.5)):
        outcome = CliRunner().invoke(app, args + ["--hb-cut", cut, "--out", str(tmp_path / cut)])
        assert outcome.exit_code == 0, outcome.output
        assert "skipped 1 unreadable image(s): b/corrupt.png" in outcome.output  # the help promises the listing
        result = TruncationResult.load(tmp_path / cut / "truncate_tiny_hb")
        assert result.arrays["sizes"][-1] == pytest.approx(last) and result.arrays["sizes"][-2] == pytest.approx(1.4)
        assert result.meta["hb_cut"] == cut and result.meta["layer_kinds"] == {"S4": ["hyena_1d"]}
        assert np.isfinite(result.arrays["coverage"][0]) == (cut == "offset")
    square = CliRunner().invoke(app, args + ["--hb-cut", "offset", "--shape", "square", "--out", str(tmp_path)])
    assert isinstance(square.exception, HpxError) and "no square" in str(square.exception)


def test_cli_strict_error(tiny_config, image_folder, tmp_path):
    done = subprocess.run([shutil.which("hpx-analyze"), "truncate", "--model", tiny_config("tiny_hpx"), "--weights",
                           "random", "--data", str(image_folder), "--sizes", "0", "--layers", "4", "--input-size",
                           str(SIZE), "--strict", "--no-resume", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert "unreadable image" in done.stderr and "Traceback" not in done.stderr


def _dist_args(tiny_config, tiny_weights, image_folder):
    return ["truncate", "--model", tiny_config("tiny_hpx"), "--weights", tiny_weights("tiny_hpx"), "--data",
            str(image_folder), "--layers", "2,4", "--sizes", "0,0.5,1", "--input-size", str(SIZE),
            "--batch-size", "2", "--bootstrap", "50", "--device", "cpu", "--no-resume"]


def test_torchrun_plumbing_is_a_no_op_in_one_process(monkeypatch):
    from hpx_analysis import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cpu, flags = torch.device("cpu"), torch.arange(3)
    assert distributed.setup(cpu) == (cpu, 0, 1) and distributed.rank_and_world() == (0, 1)
    assert distributed.all_reduce_sum([flags], cpu)[0] is flags
    distributed.raise_if_any_rank_failed(None, cpu)
    distributed.teardown()
    with pytest.raises(HpxError, match="unreadable"):
        distributed.raise_if_any_rank_failed(HpxError("unreadable image"), cpu)


@pytest.mark.distributed
def test_torchrun_two_processes_match_single(tiny_config, tiny_weights, image_folder, tmp_path):
    args = _dist_args(tiny_config, tiny_weights, image_folder)
    done = torchrun(args, tmp_path / "dist")
    assert done.returncode == 0, done.stderr[-3000:]
    single = one_process(args, tmp_path / "one", timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    dist_result = TruncationResult.load(tmp_path / "dist" / "truncate_tiny_hpx")
    one_result = TruncationResult.load(tmp_path / "one" / "truncate_tiny_hpx")
    assert dist_result.meta["options"]["world_size"] == 2
    for key in ("top1_correct", "top5_correct"):
        assert np.array_equal(dist_result.arrays[key], one_result.arrays[key])
    assert dist_result.meta["skipped"] == one_result.meta["skipped"] == ["b/corrupt.png"]


@pytest.mark.distributed
def test_torchrun_strict_failure_stops_every_rank(tiny_config, tiny_weights, image_folder, tmp_path):
    """Rank 0 meets the corrupt image (batch 2 of 4); rank 1 must not wait for it forever."""
    done = torchrun(_dist_args(tiny_config, tiny_weights, image_folder) + ["--strict"], tmp_path, timeout=180)
    assert done.returncode != 0
    assert "error: unreadable image" in done.stderr and "error: rank 0 failed" in done.stderr


# -- SLaK / RepLKNet: truncation of the effective large kernels -----------------------------------------------------

@pytest.fixture
def large_kernel_net():
    """name -> the golden tiny SLaK / RepLKNet (10 classes, 64 px: maps 16, 8, 4, 2, kernels 13, 11, 9, 5)."""
    from .test_large_kernel import _golden, _tiny_model
    from .conftest import golden_state_dict
    return lambda name: _tiny_model(name, golden_state_dict(_golden(name)))


@pytest.mark.parametrize("name, stage", [("slak", 0), ("replknet", 1), ("replknet_deploy", 2)])
def test_large_kernels_cut_at_every_tap_or_at_the_centre(large_kernel_net, name, stage):
    """Every tap kept: the untruncated logits (one convolution instead of the branches, to 1e-5). r = 0: the deploy
    form whose large kernels of that stage keep only their centre tap, built by hand; the model is restored exactly."""
    import copy

    from hpx_analysis.models.large_kernel import large_kernel_modules
    model, x = large_kernel_net(name), _batch(1)
    by_hand = copy.deepcopy(model).reparameterize()
    with torch.no_grad():
        for path, module in large_kernel_modules(by_hand).items():
            if path.startswith(f"stages.{stage}."):
                centre = module.kernel_size // 2
                weight = module.lkb_reparam.weight
                kept = weight[..., centre, centre].clone()
                weight.zero_()
                weight[..., centre, centre] = kept
        before = model(x)
        every = default_sizes(model, [stage], input_size=SIZE)[-1]
        with truncate_kernels(model, [stage], every, input_size=SIZE) as chosen:
            full = model(x)
        assert {info.kind for info in chosen} == {"large_conv"} and len(chosen) == 2
        with truncate_kernels(model, [stage], 0.0, input_size=SIZE):
            cut = model(x)
        expected = by_hand(x)
        after = model(x)
    torch.testing.assert_close(full, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(cut, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(cut, before, atol=1e-3)
    assert torch.equal(after, before)


@pytest.mark.parametrize("name, shape", [("slak", "disc"), ("replknet", "square")])
def test_large_kernel_sweep_matches_naive_loop(large_kernel_net, image_folder, name, shape):
    """The sweep (stem and stage steps with the downsampling between SLaK / RepLKNet stages) counts what a full
    forward per (stage, size) counts; every-tap columns equal the untruncated model."""
    model, sizes = large_kernel_net(name), [0.0, 0.5, 50.0]
    result = truncation_sweep(model, labelled_images(image_folder), [0, 3], sizes, shape, batch_size=4,
                              input_size=SIZE, n_resamples=200, progress=False)
    naive = _naive_counts(model, image_folder, sizes, [0, 3], shape, 4)
    assert np.array_equal(result.arrays["top1_correct"], naive)
    assert result.meta["layer_kinds"] == {"S1": ["large_conv"], "S4": ["large_conv"]}
    assert result.arrays["kept_fraction"][:, -1].tolist() == [1.0, 1.0]
    np.testing.assert_allclose(result.arrays["coverage"], [13 / 16, 5 / 2])  # K / F, on the r axis
