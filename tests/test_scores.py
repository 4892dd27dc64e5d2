"""Explanation scores: deletion / insertion (RISE) against an independent recomputation of the written protocol, known
answers on a model whose class reads one region, the pointing games, every method scored from Python and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from typer.testing import CliRunner

from hpx_analysis.analyzers.scores import (FaithfulnessResult, ScoreTable, energy_pointing_game, faithfulness,
                                           localisation, pointing_game, score_table)
from hpx_analysis.errors import HpxError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REGION = (slice(6, 14), slice(16, 26))  # rows, columns the region model reads


class SmallNet(nn.Module):
    """Five classes from a 3x3 convolution, ReLU and a 2 x 2 pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * self.net(x)


class RegionModel(nn.Module):
    """Two classes: logit 0 = 4 * the mean over REGION of the normalised input, logit 1 = 5 (the region of the
    test's images: 2.2 clean, 0.4 blurred, -2.0 black, so the clean image is class 0, the blurred one class 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.gain * x[(..., *REGION)].mean((1, 2, 3))
        return torch.stack([score, torch.full_like(score, 5.0)], 1)


def recomputed(model: nn.Module, images: torch.Tensor, maps: np.ndarray, steps: int, deletion: str, insertion: str,
               seed: int, targets: Sequence[int] | None = None) -> Dict[str, np.ndarray]:
    """The protocol as written in `faithfulness`'s docstring, one image and step at a time."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    raw = images * std + mean
    replacements = {"black": torch.zeros_like(raw), "mean": mean.expand_as(raw).clone()}
    if "blur" in (deletion, insertion):
        replacements["blur"] = gaussian_blur(raw, kernel_size=11, sigma=5)
    maps = maps.astype(np.float64).mean(axis=1) if maps.ndim == 4 else maps
    count, _, height, width = images.shape
    out = {name: np.zeros((count, steps + 1)) for name in ("deletion", "insertion", "random_deletion",
                                                           "random_insertion")}
    with torch.no_grad():
        def prob(image: torch.Tensor, target: int) -> float:
            return float(model(((image - mean) / std)[None]).softmax(-1)[0, target])

        for i in range(count):
            target = int(model(images[i:i + 1]).argmax()) if targets is None else targets[i]
            orders = {"": np.argsort(-maps[i].ravel().astype(np.float64), kind="stable"),
                      "random_": np.random.default_rng([seed, i]).permutation(height * width)}
            for prefix, order in orders.items():
                for k in range(steps + 1):
                    chosen = torch.from_numpy(order[:k * height * width // steps])
                    deleted = raw[i].reshape(3, -1).clone()
                    deleted[:, chosen] = replacements[deletion][i].reshape(3, -1)[:, chosen]
                    inserted = replacements[insertion][i].reshape(3, -1).clone()
                    inserted[:, chosen] = raw[i].reshape(3, -1)[:, chosen]
                    out[prefix + "deletion"][i, k] = prob(deleted.reshape(3, height, width), target)
                    out[prefix + "insertion"][i, k] = prob(inserted.reshape(3, height, width), target)
    for name in list(out):
        out[f"{name}_auc"] = np.trapezoid(out[name], x=np.arange(steps + 1) / steps, axis=1)
    return out


def random_inputs(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(rng.random((count, 3, height, width), dtype=np.float32))
    return (raw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@pytest.mark.parametrize("steps, deletion, insertion, size", [
    (7, "black", "blur", (12, 16)), (10, "blur", "mean", (9, 11)), (3, "mean", "black", (8, 8)),
    (1, "blur", "blur", (6, 7)), (150, "black", "mean", (3, 4))])
def test_curves_are_the_written_protocol_on_unseen_maps_and_images(steps: int, deletion: str, insertion: str,
                                                                    size: tuple) -> None:
    """Random images and maps (with ties), several steps (one, more than the pixels, not dividing them), every
    reference: the curves and AUCs equal the spec recomputed one image and step at a time, to 1e-5."""
    model = SmallNet().eval()
    images = random_inputs(3, *size, seed=steps)
    maps = np.random.default_rng(steps + 1).integers(0, 5, (3, *size)).astype(np.float32)  # many ties
    result = faithfulness(model, images, maps, steps=steps, deletion_reference=deletion, insertion_start=insertion,
                          batch_size=17, mean=MEAN, std=STD, seed=4)
    expected = recomputed(model, images, maps, steps, deletion, insertion, seed=4)
    for name, values in expected.items():
        np.testing.assert_allclose(result.arrays[name], values, atol=1e-5, err_msg=name)
    assert result.deletion.shape == (3, steps + 1) and result.deletion_auc.shape == (3,)
    assert result.meta["options"]["forwards_per_image"] == 4 * steps - 1  # endpoints shared by both orders


def test_channel_maps_are_averaged_and_targets_followed() -> None:
    model = SmallNet().eval()
    images = random_inputs(2, 10, 12, seed=1)
    maps = np.random.default_rng(2).random((2, 3, 10, 12)).astype(np.float32)
    result = faithfulness(model, images, torch.from_numpy(maps), steps=6, target=[1, 3], mean=MEAN, std=STD)
    expected = recomputed(model, images, maps, 6, "black", "blur", seed=0, targets=[1, 3])
    for name, values in expected.items():
        np.testing.assert_allclose(result.arrays[name], values, atol=1e-5, err_msg=name)
    averaged = faithfulness(model, images, maps.astype(np.float64).mean(1), steps=6, target=[1, 3], mean=MEAN,
                            std=STD)
    np.testing.assert_array_equal(averaged.deletion, result.deletion)
    assert result.targets.tolist() == [1, 3]


def test_ties_are_ordered_by_flat_index() -> None:
    """A constant map deletes in flat-index order: the curves of a strictly decreasing map over the flat index."""
    model = SmallNet().eval()
    images = random_inputs(2, 8, 10, seed=3)
    constant = faithfulness(model, images, np.zeros((2, 8, 10)), steps=9, mean=MEAN, std=STD)
    decreasing = faithfulness(model, images, np.broadcast_to(-np.arange(80.0).reshape(8, 10), (2, 8, 10)), steps=9,
                              mean=MEAN, std=STD)
    two_levels = np.zeros((2, 8, 10))
    two_levels[:, 4:] = -1  # rows 0-3 first (tied, by index), then rows 4-7
    levelled = faithfulness(model, images, two_levels, steps=9, mean=MEAN, std=STD)
    for name in ("deletion", "insertion"):
        np.testing.assert_allclose(constant.arrays[name], decreasing.arrays[name], atol=1e-6)
        np.testing.assert_allclose(levelled.arrays[name], decreasing.arrays[name], atol=1e-6)


def test_the_region_the_class_reads_is_deleted_fastest_and_inserted_fastest() -> None:
    """A model whose class-0 logit is the mean of one region of the input: the map marking the region deletes the
    class faster than a random order (lower deletion AUC) and restores it faster (higher insertion AUC); a map that
    marks the complement does worse than random on both."""
    rng = np.random.default_rng(5)
    raw = rng.random((4, 3, 24, 32), dtype=np.float32) * 0.2
    raw[(..., *REGION)] = 0.9 + 0.1 * rng.random((4, 3, 8, 10), dtype=np.float32)
    images = (torch.from_numpy(raw) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    region = np.zeros((4, 24, 32))
    region[(..., *REGION)] = 1
    model = RegionModel()
    marked = faithfulness(model, images, region, steps=20, mean=MEAN, std=STD)
    assert (marked.targets == 0).all()
    assert (marked.deletion_auc < marked.random_deletion_auc - 0.15).all()
    assert (marked.insertion_auc > marked.random_insertion_auc + 0.15).all()
    # the region is 80 of 768 pixels: gone after 80 * 20 // 768 + 1 = 3 steps, the probability at its floor then
    assert np.allclose(marked.deletion[:, 3:], marked.deletion[:, -1:], atol=1e-6)
    wrong = faithfulness(model, images, 1 - region, steps=20, mean=MEAN, std=STD)
    assert (wrong.deletion_auc > wrong.random_deletion_auc).all()
    assert (wrong.insertion_auc < wrong.random_insertion_auc).all()
    np.testing.assert_array_equal(wrong.random_deletion, marked.random_deletion)  # the baseline ignores the map


def test_bad_input_is_a_one_line_error() -> None:
    model, images = SmallNet().eval(), random_inputs(2, 8, 8, seed=0)
    maps = np.zeros((2, 8, 8))
    for kwargs, message in [({"steps": 0}, "steps must be"), ({"steps": 2.5}, "steps must be"),
                            ({"steps": 1001}, r"steps \(1001\) must be at most 1000 or the number of pixels \(64\)"),
                            ({"deletion_reference": "grey"}, "unknown deletion_reference 'grey'"),
                            ({"insertion_start": "noise"}, "unknown insertion_start"),
                            ({"target": [1]}, "one per image"), ({"batch_size": 0}, "batch size")]:
        with pytest.raises(HpxError, match=message):
            faithfulness(model, images, maps, mean=MEAN, std=STD, **kwargs)
    for bad, message in [(np.zeros((3, 8, 8)), "3 maps for 2 images"), (np.zeros((2, 4, 4)), "input resolution"),
                         (np.full((2, 8, 8), np.nan), "non-finite"), (np.zeros((2, 64)), "must be")]:
        with pytest.raises(HpxError, match=message):
            faithfulness(model, images, bad, mean=MEAN, std=STD)
    with pytest.raises(HpxError, match="larger than 5 px"):
        faithfulness(model, random_inputs(1, 5, 9, seed=0), np.zeros((1, 5, 9)), mean=MEAN, std=STD)


def test_resume_reuses_a_finished_run_and_a_new_map_is_scored_afresh(tmp_path: Path, capsys) -> None:
    model, images = SmallNet().eval(), random_inputs(3, 8, 8, seed=6)
    maps = np.random.default_rng(0).random((3, 8, 8))
    first = faithfulness(model, images, maps, steps=5, batch_size=19, resume_dir=tmp_path, mean=MEAN, std=STD)
    assert first.meta["options"]["batches_computed"] == 3  # 19 forwards: one image (19 variants) per batch
    again = faithfulness(model, images, maps, steps=5, batch_size=19, resume_dir=tmp_path, mean=MEAN, std=STD)
    assert again.meta["options"]["batches_resumed"] == 3 and again.meta["options"]["batches_computed"] == 0
    assert "reusing the finished run" in capsys.readouterr().err
    np.testing.assert_array_equal(again.deletion, first.deletion)
    loaded = FaithfulnessResult.load(first.save(tmp_path / "faithfulness"))
    np.testing.assert_array_equal(loaded.random_insertion_auc, first.random_insertion_auc)
    assert loaded.steps == 5 and loaded.meta["options"]["deletion_reference"] == "black"
    changed = maps.copy()
    changed[0, 0, 0] += 1
    for kwargs in ({"maps": changed}, {"maps": maps, "seed": 1}, {"maps": maps, "insertion_start": "mean"}):
        fresh = faithfulness(model, images, kwargs.pop("maps"), steps=5, batch_size=19, resume_dir=tmp_path,
                             mean=MEAN, std=STD, **kwargs)
        assert fresh.meta["options"]["batches_computed"] == 3


def test_several_images_share_a_forward_and_give_the_same_curves() -> None:
    model, images = SmallNet().eval(), random_inputs(5, 8, 8, seed=7)
    maps = np.random.default_rng(1).random((5, 8, 8))
    one = faithfulness(model, images, maps, steps=4, batch_size=5, mean=MEAN, std=STD)
    shared = faithfulness(model, images, maps, steps=4, batch_size=45, mean=MEAN, std=STD)  # 3 images of 15
    assert one.meta["options"]["batches_total"] == 5 and shared.meta["options"]["batches_total"] == 2
    for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
        np.testing.assert_allclose(shared.arrays[name], one.arrays[name], atol=1e-6)


# -- localisation ---------------------------------------------------------------------------------------------------

def test_pointing_game_and_its_tolerance() -> None:
    """Box columns 10-19, rows 5-14 (pixel-edge box 10, 5, 20, 15) on a 30 x 40 map."""
    box = np.array([[10.0, 5.0, 20.0, 15.0]])
    maps = np.zeros((4, 30, 40))
    maps[0, 14, 19] = 1  # the box's last pixel: a hit
    maps[1, 14, 30] = 1  # 11 px right of it
    maps[2, 25, 5] = 1   # no box for this image
    maps[3] = 0.5        # flat: no maximum, points nowhere
    boxes = [box, box, None, box]
    np.testing.assert_array_equal(pointing_game(maps, boxes), [1, 0, np.nan, np.nan])
    np.testing.assert_array_equal(pointing_game(maps, boxes, tolerance=11), [1, 1, np.nan, np.nan])
    np.testing.assert_array_equal(pointing_game(maps, boxes, tolerance=10.9), [1, 0, np.nan, np.nan])
    np.testing.assert_array_equal(pointing_game(maps, boxes, tolerance=15), [1, 1, np.nan, np.nan])  # sqrt(125) = 11.2
    maps[3, 0, 0] = 0.6  # the first pixel, 5 rows and 10 columns from the box
    np.testing.assert_array_equal(pointing_game(maps, boxes, tolerance=15)[3], 1)


def test_energy_pointing_game_counts_the_positive_mass_inside_the_boxes() -> None:
    maps = np.zeros((3, 20, 20))
    maps[0, 2, 2] = 3      # inside the first box
    maps[0, 12, 12] = 1    # inside the second
    maps[0, 18, 0] = 4     # outside
    maps[0, 0, 19] = -10   # negative: not counted
    maps[1] = -1           # no positive mass
    maps[2, 0, 0] = 1
    boxes = [np.array([[0.0, 0, 5, 5], [10, 10, 15, 15]]), np.array([[0.0, 0, 5, 5]]), np.zeros((0, 4))]
    np.testing.assert_array_equal(energy_pointing_game(maps, boxes), [0.5, np.nan, np.nan])
    result = localisation(maps, boxes, names=["a", "b", "c"])
    assert result.meta["images"] == ["a", "b", "c"] and result.arrays["boxes"].shape == (3, 5)
    with pytest.raises(HpxError, match="2 box lists for 3 maps"):
        pointing_game(maps, boxes[:2])


# -- every method, from Python and the CLI --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from hpx_analysis.models.zoo import load_model
    from .conftest import TINY
    model = load_model(str(TINY / "tiny_hpx.json"), "random", seed=0)
    return model, random_inputs(1, 64, 64, seed=9)


@pytest.mark.parametrize("method", ["fgvis", "saliency", "integrated-gradients", "occlusion", "gradcam"])
def test_every_method_is_scored_from_python(method: str, tiny: tuple) -> None:
    from hpx_analysis import explain, faithfulness as top_faithfulness, localisation as top_localisation

    model, images = tiny
    options = {"iterations": 2, "lambda_tries": 1} if method == "fgvis" else {"ig_steps": 4}
    if method == "fgvis":
        from hpx_analysis.analyzers.fgvis import FgvisSettings
        options = {"settings": FgvisSettings(iterations=2, lambda_tries=1)}
    explanation = explain(model, images, method, mean=MEAN, std=STD, **options)
    scored = top_faithfulness(model, images, explanation, steps=4, mean=MEAN, std=STD)
    assert scored.meta["method"] == method and scored.deletion.shape == (1, 5)
    np.testing.assert_allclose(scored.deletion[:, 0], scored.insertion[:, -1])  # both the clean image
    assert scored.targets.tolist() == explanation.meta["targets"]
    located = top_localisation(explanation, [np.array([[0.0, 0.0, 32.0, 64.0]])])
    assert located.meta["method"] == method and 0 <= located.energy_pointing[0] <= 1


def test_score_table_summarises_each_entry_and_saves_itself(tmp_path: Path) -> None:
    model, images = SmallNet().eval(), random_inputs(4, 8, 8, seed=2)
    rng = np.random.default_rng(3)
    entries = []
    for method in ("a", "b"):
        maps = rng.random((4, 8, 8))
        boxes = [np.array([[0.0, 0, 4, 4]])] * 3 + [None]
        entries.append(("small", method, faithfulness(model, images, maps, steps=4, mean=MEAN, std=STD),
                        localisation(maps, boxes)))
    table = score_table(entries, n_resamples=200, seed=1)
    assert table.arrays["deletion"].shape == (2, 4, 5) and table.arrays["pointing"].shape == (2, 4)
    stats = table.summary["deletion_auc"][1]
    assert stats["n"] == 4 and np.isclose(stats["mean"], entries[1][2].deletion_auc.mean())
    assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
    assert table.summary["pointing"][0]["n"] == 3  # the image without a box left out
    table.save(tmp_path / "scores")
    loaded = ScoreTable.load(tmp_path / "scores")
    assert loaded.entries == [{"model": "small", "method": "a"}, {"model": "small", "method": "b"}]
    np.testing.assert_array_equal(loaded.arrays["insertion"], table.arrays["insertion"])
    with pytest.raises(HpxError, match="same scores"):
        score_table([entries[0], ("small", "c", entries[1][2], None)])


def test_cli_scores_every_method(tiny_config, tiny_weights, tmp_path: Path) -> None:
    """Every method on 2 images, all four metrics: one scores result with every entry, one figure, a table row
    per method, one `wrote` line per file; a rerun reuses the scoring runs."""
    from hpx_analysis_cli.app import app

    (tmp_path / "boxes.csv").write_text("filename,xmin,ymin,xmax,ymax\nastronaut.png,100,0,400,300\n"
                                        "chelsea,50,20,300,250\nchelsea,0,0,10,10\n")
    methods = ["fgvis", "saliency", "integrated-gradients", "occlusion", "gradcam"]
    args = ["explain", "-m", tiny_config("tiny_hpx"), "-w", tiny_weights("tiny_hpx"), *[a for m in methods for a in
            ("--method", m)], "--input-size", "64", "--num-images", "2", "--iterations", "2", "--lambda-tries", "1",
            "--metrics", "deletion,insertion", "--metrics", "pointing,energy-pointing", "--boxes",
            str(tmp_path / "boxes.csv"), "--score-steps", "4", "--bootstrap", "100", "--device", "cpu", "-o",
            str(tmp_path / "out")]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    stem = tmp_path / "out" / "explain" / f"scores_tiny_hpx_{'+'.join(methods)}"
    table = ScoreTable.load(stem)
    assert [entry["method"] for entry in table.entries] == methods
    assert table.arrays["deletion"].shape == (5, 2, 5) and table.arrays["energy_pointing"].shape == (5, 2)
    assert table.meta["images"] == ["astronaut", "chelsea"] and table.meta["cli_options"]["metrics"] == [
        "deletion", "insertion", "pointing", "energy-pointing"]
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert [lines[header + 1 + i].split()[1] for i in range(5)] == methods
    assert "pointing" in lines[header] and "random deletion AUC" in lines[header]
    for suffix in (".npz", ".json", ".pdf", ".png", ".figure.json"):
        assert f"wrote {stem}{suffix}" in run.stdout
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["options"]["faithfulness"]["steps"] == 4 and meta["options"]["localisation"]["tolerance"] == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reusing the finished run") == 10  # 5 explanations, 5 scores


def test_cli_pointing_without_boxes_and_unknown_metrics_are_one_line_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    from hpx_analysis_cli.app import app

    run = subprocess.run([sys.executable, "-c", "from hpx_analysis_cli.app import main; main()", "explain", "-m",
                          "tiny", "--metrics", "deletion,pointing", "-o", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr == "error: the pointing games need object boxes: give --boxes PATH " \
        "(ImageNet's val XMLs, their .tgz, or a CSV filename,xmin,ymin,xmax,ymax)\n"
    for extra, message in [(["--metrics", "auc"], "unknown metric 'auc'; use one or more of deletion, insertion"),
                           (["--metrics", "pointing", "--boxes", str(tmp_path / "none.csv")], "box file not found")]:
        failed = CliRunner().invoke(app, ["explain", "-m", "tiny", "-o", str(tmp_path), *extra])
        assert isinstance(failed.exception, HpxError) and str(failed.exception).startswith(message)


def test_explain_models_scores_from_python(tiny_config, tiny_weights, tmp_path: Path) -> None:
    from hpx_analysis.workflows import ModelSpec, explain_models, explanation_scores

    (tmp_path / "boxes.csv").write_text("astronaut,0,0,512,512\n")
    spec = ModelSpec(tiny_config("tiny_hpx"), tiny_weights("tiny_hpx"))
    explained = explain_models([spec], ["saliency"], num_images=1, input_size=32, metrics=["pointing", "deletion"],
                               boxes=tmp_path / "boxes.csv", score_steps=3)
    item = explained[0]
    assert item.faithfulness.deletion.shape == (1, 4) and item.localisation.pointing.tolist() == [1.0]
    table = explanation_scores(explained, n_resamples=50)
    assert table.scores == ["deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc", "pointing",
                            "energy_pointing"]
    with pytest.raises(HpxError, match="none of the 1 images has a box"):
        (tmp_path / "other.csv").write_text("coffee,0,0,10,10\n")
        explain_models([spec], ["saliency"], num_images=1, input_size=32, metrics=["pointing"],
                       boxes=tmp_path / "other.csv")
