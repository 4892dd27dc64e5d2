"""The offline demo (issue 7): task generators with known geometry, proxy training and its cache, the
known answers that the trained proxies must show, and `hpx-analyze demo` end to end: from the proxies shipped with
the package (fast; issue 23) and with `--retrain` (slow); the shipped proxies are what the current code and
configuration produce."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hpx_analysis.demo.pipeline import (CONV_PROXY, GLOBAL_TASK, HPX_PROXY, HYENA_ND_PROXY, LOCAL_TASK, DemoSettings,
                                        explain_and_score, fgvis_checks, fgvis_numbers, known_answers, mark_boxes,
                                        shipped_proxy)
from hpx_analysis.demo import ship, shipped
from hpx_analysis.demo.tasks import (GRID, IMAGE_SIZE, MARK, MIN_GAP, ROW_GAP, TASKS, TaskBatch, sample_task,
                                     task_parameters)
from hpx_analysis.demo.training import TrainingConfig, load_or_train, task_accuracy
from hpx_analysis.errors import HpxError
from hpx_analysis.models.proxies import PROXY_NAMES, proxy_configuration
from hpx_analysis.models.zoo import count_parameters, load_model
from hpx_analysis.results import to_jsonable

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
    """HyenaPixel, ConvFormer and Hyena N-D proxies within 3% of one another (53,892 / 52,814 / 53,390)."""
    counts = {name: count_parameters(load_model(name, "random")) for name in PROXY_NAMES}
    assert list(counts) == [HPX_PROXY, CONV_PROXY, HYENA_ND_PROXY]
    assert (max(counts.values()) - min(counts.values())) / max(counts.values()) < 0.03, counts


def test_hyena_nd_proxy_reads_the_whole_image_at_token_0():
    """The Hyena N-D proxy's head reads token 0 (top-left of 16 x 16); its first block is anti-causal, so a mark
    anywhere changes token 0 after block 1, and only through the long kernels: cut to the centre tap, a mark
    beyond the 3x3 short filter's reach leaves token 0 as it was."""
    from hpx_analysis.interventions import truncate_kernels
    from hpx_analysis.models.hyena_nd import HyenaNDViT
    model = load_model(HYENA_ND_PROXY, "random")
    assert isinstance(model, HyenaNDViT) and model.block_kinds == ["hyena_nd:seq", "hyena_nd:standard", "hyena_nd:seq"]
    assert model.patch_embed.grid_size == (16, 16) and model.num_classes == 2
    blank, marked = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    marked[..., 48:56, 40:48] = 1.0  # a mark at token rows/columns 12-13, 10-11

    def token0_after_block1(images):
        return model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(images))))[:, 0]
    with torch.no_grad():
        assert (token0_after_block1(marked) - token0_after_block1(blank)).abs().max() > 1e-4
        with truncate_kernels(model, stages=[0], size=0.0, input_size=IMAGE_SIZE):
            torch.testing.assert_close(token0_after_block1(marked), token0_after_block1(blank))


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """``hpx-analyze demo --retrain`` from an empty cache: the six proxies trained from scratch with the demo's
    settings (not the shipped ones), every analysis run on them. (cache, gallery folder, CLI result)."""
    from hpx_analysis_cli.app import app
    cache, out = tmp_path_factory.mktemp("demo_cache"), tmp_path_factory.mktemp("demo_retrained")
    result = CliRunner().invoke(app, ["demo", "--retrain", "--out", str(out), "--cache", str(cache)])
    return cache, out, result


@pytest.fixture(scope="module")
def trained(retrained):
    """The demo's six proxies as trained by ``--retrain`` into the module cache (trained here when that failed)."""
    cache = retrained[0]
    runs = {}
    for task in (GLOBAL_TASK, LOCAL_TASK):
        for name in PROXY_NAMES:
            runs[name, task] = load_or_train(DEFAULTS.training(name, task), cache, progress=False)
    return cache, runs


@pytest.mark.slow
def test_known_answers_of_the_trained_proxies(trained):
    """HyenaPixel and Hyena N-D solve the global task, the equal-size ConvFormer stays far below, all solve the
    local one."""
    _, runs = trained
    accuracy = {key: record["accuracy"] for key, (_, record, _) in runs.items()}
    assert accuracy[HPX_PROXY, GLOBAL_TASK] >= 0.9 and accuracy[HYENA_ND_PROXY, GLOBAL_TASK] >= 0.9
    assert accuracy[CONV_PROXY, GLOBAL_TASK] <= accuracy[HPX_PROXY, GLOBAL_TASK] - 0.2
    assert min(accuracy[name, LOCAL_TASK] for name in PROXY_NAMES) >= 0.9


@pytest.mark.slow
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


@pytest.mark.slow
def test_erf_of_the_global_proxy_is_larger(trained):
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.images import normalise
    _, runs = trained
    images = normalise(sample_task(GLOBAL_TASK, 16, seed=5).images, (0.5,) * 3, (0.5,) * 3)
    ratio = {name: effective_receptive_field(runs[name, GLOBAL_TASK][0], images, input_size=64, progress=False)
             .meta["models"][0]["area_ratios"]["0.5"] for name in PROXY_NAMES}
    assert ratio[HPX_PROXY] > 2 * ratio[CONV_PROXY]


@pytest.mark.slow
@pytest.mark.parametrize("name", [HPX_PROXY, HYENA_ND_PROXY])
def test_global_proxy_needs_its_long_kernels(trained, name):
    """Cutting the trained proxy's long kernels to their centre tap leaves chance, keeping every tap changes
    nothing (the Hyena N-D proxy's three blocks are all stage 0)."""
    from hpx_analysis.interventions import truncate_kernels
    from hpx_analysis.images import model_mean_std, normalise
    _, runs = trained
    model = runs[name, GLOBAL_TASK][0]
    inputs = normalise(sample_task(GLOBAL_TASK, 256, seed=9).images, *model_mean_std(model))
    logits = model(inputs)
    with truncate_kernels(model, stages=[0], size=0.0, input_size=IMAGE_SIZE):
        assert abs(task_accuracy(model, GLOBAL_TASK, 512, 0) - 0.5) <= 0.1
    # every tap: the disc's corner taps lie at 15 * sqrt(2) / 8 = 2.65 half feature maps (r = 2 keeps 793 of 961);
    # for Hyena N-D the (modified) canvas kernel then replaces the causal path, the same function
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
    assert parameters["hyena_nd_steps"].default == DEFAULTS.hyena_nd_global_steps
    assert parameters["retrain"].default is False


def test_hyena_nd_filter_networks_learn_at_their_own_rate():
    """Per block: positions z, the sine MLP's four layers (7 tensors, the shared sine frequency once) go to the slow
    group; the skip gain ``bias`` and everything else stay at the full rate; models without Hyena N-D: one group."""
    from hpx_analysis.demo.training import parameter_groups
    config = TrainingConfig(HYENA_ND_PROXY, GLOBAL_TASK, 1, lr=1e-3, filter_lr_scale=0.01)
    model = load_model(HYENA_ND_PROXY, "random")
    fast, slow = parameter_groups(model, config)
    names = {id(p): name for name, p in model.named_parameters()}
    slow_names = {names[id(p)] for p in slow["params"]}
    assert slow["lr"] == pytest.approx(1e-5) and len(slow_names) == 3 * 9
    assert all(".filter_fn." in name and not name.endswith("filter_fn.bias") for name in slow_names)
    assert len(fast["params"]) + len(slow["params"]) == len(names)
    assert len(parameter_groups(load_model(HPX_PROXY, "random"), config)) == 1


FGVIS_NUMBERS = {"deletion_auc": [0.1, 0.2], "random_deletion_auc": [0.6, 0.6], "insertion_auc": [0.9, 0.8],
                 "random_insertion_auc": [0.5, 0.6], "pointing": [1.0, 1.0], "energy_pointing": [0.2, 0.3],
                 "deleted_share": [0.02, 0.05], "flipped": [True, True]}


def test_known_answers_include_the_hyena_nd_proxy():
    """Hand-made summary numbers: the two Hyena N-D checks read its global accuracy and its r = 0 cut."""
    accuracy = {name: {GLOBAL_TASK: 1.0, LOCAL_TASK: 1.0} for name in PROXY_NAMES}
    accuracy[CONV_PROXY][GLOBAL_TASK] = 0.5
    accuracy[HYENA_ND_PROXY][GLOBAL_TASK] = 0.93
    summary = {"accuracy": accuracy, "erf_area_ratio_t0.5": {HPX_PROXY: 0.07, CONV_PROXY: 0.01},
               "truncation_all_stages": {"0.0": 0.5}, "fgvis": {HPX_PROXY: FGVIS_NUMBERS},
               "hyena_nd_truncation_all_blocks": {"0.0": 0.61}}
    checks = {c["expectation"]: (c["measured"], c["holds"]) for c in known_answers(summary)}
    assert checks["Hyena N-D proxy solves the global task (>= 90%)"] == (0.93, True)
    assert checks["its long kernels cut to the centre tap (r = 0): global task near chance (<= 60%)"] == (0.61, False)


@pytest.mark.parametrize("change, failing", [
    ({}, []),
    ({"deletion_auc": [0.5, 0.6]}, [0]),                  # deletes no faster than a random order
    ({"deletion_auc": [0.55, 0.56]}, [0]),                # below it, but not by 0.1
    ({"insertion_auc": [0.1, 0.1]}, []),                  # insertion is reported, not checked
    ({"pointing": [1.0, 0.0]}, [1]),                      # one image's maximum off the marks
    ({"pointing": [1.0, np.nan]}, []),                    # an empty map points nowhere: left out
    ({"pointing": [np.nan, np.nan]}, [1]),                # but at least half of the images must count
    ({"deleted_share": [0.02, 0.11]}, [2]),               # over the 10% budget
    ({"flipped": [True, False]}, [2]),                    # one image never flipped
])
def test_fgvis_checks_on_hand_made_numbers(change, failing):
    checks = fgvis_checks({**FGVIS_NUMBERS, **change})
    assert [i for i, (*_, holds) in enumerate(checks) if not holds] == failing
    if not change:
        assert [shown for _, _, shown, _ in checks] == ["0.150 vs 0.600", "2 of 2", "at most 5.0%"]
    if change == {"pointing": [1.0, np.nan]}:
        assert checks[1][2] == "1 of 1 (1 map empty)"


def test_mark_boxes_are_the_marks_bounding_boxes():
    batch = sample_task(GLOBAL_TASK, 6, seed=4)
    for marks, boxes in zip(batch.marks, mark_boxes(batch.marks)):
        assert boxes.shape == (2, 4)
        painted = torch.zeros_like(marks)
        for xmin, ymin, xmax, ymax in boxes.astype(int):
            assert (xmax - xmin, ymax - ymin) == (MARK, MARK)
            painted[ymin:ymax, xmin:xmax] = True
        assert torch.equal(painted, marks)


class CornerReader(torch.nn.Module):
    """Ignores the marks: class 1's logit is 20 x the spread of the normalised pixels in the top-left 16 x 16 px,
    class 0's a constant 2 (the background noise there makes class 1 the top-1; greying the corner flips it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spread = x[:, :, :16, :16].flatten(1).std(1)
        return torch.stack([torch.full_like(spread, 2.0), 20 * spread], 1)


def test_fgvis_known_answers_fail_on_models_that_do_not_use_the_marks():
    """The demo's FGVis checks can fail. A model reading only a corner without marks: FGVis deletes the corner (a
    faithful order: the deletion check holds) but points off the marks in every image. The shipped ConvFormer proxy,
    at chance on the task: no order beats the random one (deletion or insertion) and the maxima miss the marks."""
    batch = sample_task(GLOBAL_TASK, 32, seed=11)
    clear = torch.nonzero(~batch.marks[:, :20, :20].flatten(1).any(1) & (batch.labels == 1)).flatten()[:3]
    shown = TaskBatch(batch.images[clear], batch.labels[clear], batch.marks[clear])
    names = [str(int(i)) for i in clear]
    corner = fgvis_numbers(explain_and_score(CornerReader().eval(), shown, names, seed=0))
    deletion, pointing, flip = fgvis_checks(corner)
    assert len(clear) == 3 and corner["pointing"] == [0.0] * 3 and not pointing[-1]
    assert deletion[-1] and flip[-1]
    convformer = shipped_proxy(CONV_PROXY, GLOBAL_TASK)
    numbers = fgvis_numbers(explain_and_score(convformer, shown, names, seed=0))
    deletion, pointing, _ = fgvis_checks(numbers)
    assert not deletion[-1] and not pointing[-1]
    assert abs(np.mean(numbers["insertion_auc"]) - np.mean(numbers["random_insertion_auc"])) < 0.05


def _assert_demo_gallery_and_known_answers(out: Path, source: str) -> dict:
    """The demo's gallery in ``out``, every proxy from ``source``, all ten known answers holding, the ConvFormer
    proxy's FGVis scores beside."""
    for stem in ("tasks", "accuracy", "erf", "kernels", "kernels_hyena_nd", "coverage", "truncation", "fgvis", "scores"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.pdf").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert {record["source"] for record in summary["training"].values()} == {source}
    checks = {c["expectation"]: c for c in summary["known_answers"]}
    assert len(checks) == 10 and all(c["holds"] for c in checks.values()), checks
    assert set(summary["fgvis"]) == {HPX_PROXY, CONV_PROXY}
    assert all(f"| {name} |" in (out / "summary.md").read_text() for name in PROXY_NAMES)
    assert summary["hyena_nd_truncation_all_blocks"]["untruncated"] >= 0.9
    # the sweep reads the stored 64 px PNGs whole (crop_pct 1): every tap kept is the untruncated model
    every_tap = list(summary["hyena_nd_truncation_per_stage"]["S1"].values())[-1]
    assert every_tap == pytest.approx(summary["hyena_nd_truncation_all_blocks"]["untruncated"], abs=0.02)
    assert summary["known_answers"][0]["measured"] == summary["accuracy"][HPX_PROXY][GLOBAL_TASK]
    return summary


def test_cli_demo_end_to_end_on_the_shipped_proxies(tmp_path):
    """``hpx-analyze demo`` on an empty cache loads the six shipped proxies (nothing trained, no mismatch line),
    measures their held-out accuracy again and every known answer holds."""
    from hpx_analysis_cli.app import app
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "do not fit" not in result.output and "train " not in result.output
    summary = _assert_demo_gallery_and_known_answers(tmp_path / "out", "shipped")
    for pair, record in summary["training"].items():
        assert record["cached"] and Path(record["checkpoint"]).parent == shipped.SHIPPED_DIR
        assert record["accuracy"] == pytest.approx(record["accuracy_when_trained"], abs=0.01), pair
    assert not list((tmp_path / "cache").glob("*.safetensors"))
    assert "shipped with the package" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_cli_demo_retrain_end_to_end(retrained):
    """``--retrain`` trains the six from scratch (as before this release, through the cache) and reproduces the
    shipped proxies' known answers: the answers, not necessarily the bits."""
    cache, out, result = retrained
    assert result.exit_code == 0, result.output
    assert "do not fit" not in result.output
    summary = _assert_demo_gallery_and_known_answers(out, "trained")
    assert all(not record["cached"] and Path(record["checkpoint"]).parent == cache
               for record in summary["training"].values())
    assert len(list(cache.glob("*.safetensors"))) == 6


def test_shipped_proxies_are_what_the_code_and_configuration_produce():
    """Each of the six shipped proxies records the demo's current training configuration, proxy configuration, task
    parameters and fingerprint of the code its weights depend on (so its key is the current one), its weights match
    the digest in its metadata and load strictly into the current architecture. After an edit of that code or
    configuration this fails until the proxies are regenerated: ``python -m hpx_analysis.demo.ship``."""
    hint = f"the shipped demo proxies are stale; regenerate them with `{shipped.REGENERATE}`"
    fingerprint, total = shipped.weights_fingerprint(), 0
    for task in TASKS:
        for name in PROXY_NAMES:
            config = DEFAULTS.training(name, task)
            path = shipped.shipped_path(name, task)
            assert path.is_file(), hint
            total += path.stat().st_size
            meta = shipped.read_metadata(path)
            assert meta["training"] == to_jsonable(asdict(config)), hint
            assert meta["proxy"] == to_jsonable(proxy_configuration(name)), hint
            assert meta["task_parameters"] == to_jsonable(task_parameters(task)), hint
            assert meta["code_parts"] == shipped.weights_code() and meta["code_fingerprint"] == fingerprint, hint
            assert meta["key"] == shipped.weights_key(config), hint
            assert set(meta["record"]) >= {"accuracy", "final_loss", "seconds", "parameters", "torch"}
            found, why = shipped.mismatch(config)
            assert found is not None and why == "", why
            model = shipped.load_shipped(found)  # strict: every key, every shape
            fresh = load_model(name, "random").state_dict()
            assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
            assert meta["record"]["parameters"] == count_parameters(model)
    assert ship.verify() == []
    assert total < 2_000_000, total


def test_the_weights_key_follows_only_what_sets_the_weights(monkeypatch, tmp_path):
    """The shipped proxies' key changes with the training configuration, the proxy's configuration, the task
    generator and the fingerprinted code, and not with the rest of the package (unlike the demo cache's key)."""
    from hpx_analysis import engine
    from hpx_analysis.demo import tasks
    from hpx_analysis.models import proxies
    config = DEFAULTS.training(HPX_PROXY, GLOBAL_TASK)
    key, cache_key = shipped.weights_key(config), config.key()
    # an edit elsewhere in the package
    monkeypatch.setattr(engine, "checked_code_fingerprint", lambda: "another package")
    assert config.key() != cache_key and shipped.weights_key(config) == key
    monkeypatch.undo()
    assert shipped.weights_key(DEFAULTS.training(HPX_PROXY, LOCAL_TASK)) != key
    assert shipped.weights_key(TrainingConfig(HPX_PROXY, GLOBAL_TASK, 799)) != key
    monkeypatch.setitem(proxies.PROXY_DIMS, HPX_PROXY, (48,))
    assert shipped.weights_key(config) != key
    monkeypatch.undo()
    monkeypatch.setattr(tasks, "MIN_GAP", 36)
    assert shipped.weights_key(config) != key
    monkeypatch.undo()
    assert shipped.weights_key(config) == key
    # the fingerprint reads exactly the listed files: a copy of them gives the same, an edit of one another
    root = tmp_path / "hpx_analysis"
    for name in shipped.WEIGHTS_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shipped.PACKAGE_ROOT / name, root / name)
    assert shipped.weights_fingerprint(root) == shipped.weights_fingerprint()
    (root / "models/long_filters.py").write_text((root / "models/long_filters.py").read_text() + "\n# edited\n")
    changed = shipped.weights_code(root)
    assert [n for n in changed if changed[n] != shipped.weights_code()[n]] == ["models/long_filters.py"]
    assert shipped.weights_key(config, shipped.weights_fingerprint(root)) != key


def test_every_module_the_fingerprinted_code_imports_is_fingerprinted_or_excused():
    """Following the imports of the fingerprinted modules (and of the modules whose fingerprinted functions the
    training calls) reaches only modules that are fingerprinted or listed, with a reason, as not setting the
    weights: a new module that the proxies' code starts to import must be classified."""
    graph = library_imports()
    fingerprinted = {"hpx_analysis." + name[:-3].replace("/", ".") for name in shipped.WEIGHTS_FILES}
    assert fingerprinted <= set(graph)
    assert {module for module, _ in shipped.WEIGHTS_FUNCTIONS} <= set(shipped.NOT_FINGERPRINTED)
    unclassified, seen, todo = set(), set(), sorted(fingerprinted)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in graph[module]:
            if imported in shipped.NOT_FINGERPRINTED:
                continue
            if imported not in fingerprinted:
                unclassified.add(f"{module} -> {imported}")
            todo.append(imported)
    assert not unclassified, unclassified


def test_proxies_that_do_not_fit_are_named_in_one_line_and_trained(monkeypatch, capsys, tmp_path):
    """Other settings or changed code: one line says which shipped proxies do not fit and why, and those (only
    those) are trained as ``--retrain`` does (here a stand-in for the training); ``retrain`` uses none."""
    from hpx_analysis.demo import pipeline
    trained = []

    def fake_load_or_train(config, cache_dir, progress=True):
        trained.append((config.model, config.task))
        return load_model(config.model, "random"), {"accuracy": 0.5, "cached": False}, Path(cache_dir) / "x"
    monkeypatch.setattr(pipeline, "load_or_train", fake_load_or_train)
    models, records = pipeline.load_proxies(tmp_path, DemoSettings(global_steps=400), progress=False)
    line = capsys.readouterr().err.strip()
    assert trained == [(HPX_PROXY, GLOBAL_TASK), (CONV_PROXY, GLOBAL_TASK)] and "\n" not in line
    assert line.startswith("the shipped demo proxies do not fit this code and configuration (proxy_hpx_former/same-row"
                           ", proxy_convformer/same-row: trained with other settings (steps 800 here 400))")
    assert line.endswith("training those as --retrain does")
    assert records[f"{HPX_PROXY}/{GLOBAL_TASK}"]["source"] == "trained"
    assert {records[f"{name}/{LOCAL_TASK}"]["source"] for name in PROXY_NAMES} == {"shipped"}
    assert records[f"{HYENA_ND_PROXY}/{GLOBAL_TASK}"]["source"] == "shipped"
    assert len(models) == 6

    code = {**shipped.weights_code(), "models/long_filters.py": "0" * 64}
    monkeypatch.setattr(shipped, "weights_code", lambda root=shipped.PACKAGE_ROOT: code)
    found, message = shipped.select_shipped({(n, t): DEFAULTS.training(n, t) for t in TASKS for n in PROXY_NAMES})
    assert found == {} and message == ("the shipped demo proxies do not fit this code and configuration (all: code "
                                       "changed: models/long_filters.py); training them as --retrain does")
    trained.clear()
    pipeline.load_proxies(tmp_path, DEFAULTS, retrain=True, progress=False)
    assert len(trained) == 6 and capsys.readouterr().err == ""


def test_a_damaged_shipped_proxy_is_refused(tmp_path):
    """Weights that do not match the digest in the metadata: one line, never loaded."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    source = shipped.shipped_path(CONV_PROXY, LOCAL_TASK)
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    tensors["head.fc.fc1.weight"][0, 0] += 1.0
    save_file(tensors, str(shipped.shipped_path(CONV_PROXY, LOCAL_TASK, tmp_path)), metadata=metadata)
    found, why = shipped.mismatch(DEFAULTS.training(CONV_PROXY, LOCAL_TASK), tmp_path)
    assert why == ""
    with pytest.raises(HpxError, match="is damaged: its weights do not match the digest in its metadata"):
        shipped.load_shipped(found)
