"""The offline demo (issue 7): task generators with known geometry, proxy training and its cache, the
known answers that the trained proxies must show, and `hpx-analyze demo` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hpx_analysis.demo.pipeline import (CONV_PROXY, GLOBAL_TASK, HPX_PROXY, LOCAL_TASK, DemoSettings,
                                        deleted_mass_on_marks)
from hpx_analysis.demo.tasks import GRID, IMAGE_SIZE, MARK, MIN_GAP, ROW_GAP, sample_task
from hpx_analysis.demo.training import TrainingConfig, load_or_train, task_accuracy
from hpx_analysis.models.proxies import PROXY_NAMES
from hpx_analysis.models.zoo import count_parameters, load_model

from .conftest import library_imports

DEFAULTS = DemoSettings()


def _mark_boxes(marks: torch.Tensor):
    """Top-left corners (row, col) of the two marks of one (S, S) mask, left to right."""
    rows, cols = torch.nonzero(marks, as_tuple=True)
    left = cols < cols.min() + MARK
    return [(int(rows[side].min()), int(cols[side].min())) for side in (left, ~left)]


def test_tasks_have_the_geometry_their_labels_say():
    batch = sample_task("same-row", 400, seed=3)
    assert batch.images.shape == (400, 3, 64, 64) and batch.labels.sum() == 200
    assert 0 <= float(batch.images.min()) and float(batch.images.max()) <= 1
    for marks, label in zip(batch.marks, batch.labels.tolist()):
        (row_a, col_a), (row_b, col_b) = _mark_boxes(marks)
        assert int(marks.sum()) == 2 * MARK * MARK and col_b - col_a >= MIN_GAP
        assert (row_a == row_b) == bool(label) and (label or abs(row_a - row_b) >= ROW_GAP)
        assert all(position % GRID == 0 for position in (row_a, col_a, row_b, col_b))
    assert torch.equal(sample_task("same-row", 8, seed=3).images, sample_task("same-row", 8, seed=3).images)
    stripes = sample_task("stripes", 20, seed=1)
    for image, marks, label in zip(stripes.images, stripes.marks, stripes.labels.tolist()):
        (row, col), _ = _mark_boxes(marks)
        patch = image[0, row:row + MARK, col:col + MARK]
        varies_along = patch.diff(dim=0).abs().sum() if label == 0 else patch.diff(dim=1).abs().sum()
        constant_along = patch.diff(dim=1).abs().sum() if label == 0 else patch.diff(dim=0).abs().sum()
        assert varies_along > 0 and constant_along == 0


def test_proxies_have_equal_parameter_budgets():
    counts = [count_parameters(load_model(name, "random")) for name in PROXY_NAMES]
    assert abs(counts[0] - counts[1]) / max(counts) < 0.03


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's four proxies, trained once with the demo's settings into a module cache."""
    cache = tmp_path_factory.mktemp("demo_cache")
    runs = {}
    for task, steps in ((GLOBAL_TASK, DEFAULTS.global_steps), (LOCAL_TASK, DEFAULTS.local_steps)):
        for name in PROXY_NAMES:
            runs[name, task] = load_or_train(TrainingConfig(name, task, steps), cache, progress=False)
    return cache, runs


def test_known_answers_of_the_trained_proxies(trained):
    """HyenaPixel solves the global task, the equal-size ConvFormer stays far below, both solve the local one."""
    _, runs = trained
    accuracy = {key: record["accuracy"] for key, (_, record, _) in runs.items()}
    assert accuracy[HPX_PROXY, GLOBAL_TASK] >= 0.9
    assert accuracy[CONV_PROXY, GLOBAL_TASK] <= accuracy[HPX_PROXY, GLOBAL_TASK] - 0.2
    assert min(accuracy[name, LOCAL_TASK] for name in PROXY_NAMES) >= 0.9


def test_cached_proxy_loads_through_the_checkpoint_path(trained):
    cache, runs = trained
    model, record, checkpoint = runs[HPX_PROXY, GLOBAL_TASK]
    again, record_again, same_file = load_or_train(TrainingConfig(HPX_PROXY, GLOBAL_TASK, DEFAULTS.global_steps),
                                                   cache, progress=False)
    assert same_file == checkpoint and record_again["cached"] and record_again["seconds"] == record["seconds"]
    assert model.hpx_provenance["weights_file"] == str(checkpoint.resolve())
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    assert task_accuracy(again, GLOBAL_TASK, 512, 0) == record["accuracy"]


def test_erf_of_the_global_proxy_is_larger(trained):
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.images import normalise
    _, runs = trained
    images = normalise(sample_task(GLOBAL_TASK, 16, seed=5).images, (0.5,) * 3, (0.5,) * 3)
    ratio = {name: effective_receptive_field(runs[name, GLOBAL_TASK][0], images, input_size=64, progress=False)
             .meta["models"][0]["area_ratios"]["0.5"] for name in PROXY_NAMES}
    assert ratio[HPX_PROXY] > 2 * ratio[CONV_PROXY]


def test_global_proxy_needs_its_long_kernels(trained):
    """Cutting the trained proxy's long kernels to their centre tap leaves chance, keeping every tap changes
    nothing."""
    from hpx_analysis.analyzers.truncation import truncate_kernels
    from hpx_analysis.images import model_mean_std, normalise
    _, runs = trained
    model = runs[HPX_PROXY, GLOBAL_TASK][0]
    inputs = normalise(sample_task(GLOBAL_TASK, 256, seed=9).images, *model_mean_std(model))
    logits = model(inputs)
    with truncate_kernels(model, stages=[0], size=0.0, input_size=IMAGE_SIZE):
        assert abs(task_accuracy(model, GLOBAL_TASK, 512, 0) - 0.5) <= 0.1
    # every tap: the disc's corner taps lie at 15 * sqrt(2) / 8 = 2.65 half feature maps (r = 2 keeps 793 of 961)
    with truncate_kernels(model, stages=[0], size=3.0, input_size=IMAGE_SIZE):
        torch.testing.assert_close(model(inputs), logits)


def test_plotting_never_imports_the_demo():
    """The demo is an app over the library and owns its figures: no module of ``hpx_analysis.plotting``
    imports ``hpx_analysis.demo``, at module level or inside a function (read from the source)."""
    graph = library_imports()
    plotting = [name for name in graph if name.startswith("hpx_analysis.plotting")]
    demo_imports = {name: {m for m in graph[name] if m.startswith("hpx_analysis.demo")} for name in plotting}
    assert plotting and not any(demo_imports.values()), demo_imports


def test_cli_defaults_are_the_demo_settings():
    """The CLI spells its step defaults out (importing DemoSettings would import torch for ``--help``)."""
    import inspect
    from hpx_analysis_cli.demo_cmd import demo
    parameters = inspect.signature(demo).parameters
    assert parameters["global_steps"].default == DEFAULTS.global_steps
    assert parameters["local_steps"].default == DEFAULTS.local_steps


def test_deleted_mass_on_marks():
    maps = np.zeros((2, 4, 4))
    marks = np.zeros((2, 4, 4), bool)
    marks[:, 0, :2] = True
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
    np.testing.assert_allclose(deleted_mass_on_marks(maps, marks), [0.75, 0.0])


def test_cli_demo_end_to_end(trained, tmp_path):
    from hpx_analysis_cli.app import app
    cache, _ = trained
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    for stem in ("tasks", "accuracy", "erf", "kernels", "coverage", "truncation", "fgvis"):
        assert (tmp_path / f"{stem}.png").is_file() and (tmp_path / f"{stem}.pdf").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(record["cached"] for record in summary["training"].values())  # nothing retrained
    checks = {c["expectation"]: c for c in summary["known_answers"]}
    assert len(checks) == 6 and all(c["holds"] for c in checks.values()), checks
    assert f"| {HPX_PROXY} |" in (tmp_path / "summary.md").read_text()
    loaded_acc = summary["accuracy"][HPX_PROXY][GLOBAL_TASK]
    assert summary["known_answers"][0]["measured"] == loaded_acc
