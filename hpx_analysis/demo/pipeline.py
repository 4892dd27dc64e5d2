"""``hpx-analyze demo``: load the shipped proxies (or train them), run every analyzer on them, write a gallery.

The HyenaPixel, ConvFormer and Hyena N-D proxies are trained on the global ``same-row`` task and, for
contrast, on the local ``stripes`` task. :func:`known_answers` then checks what the task design predicts
(the HyenaPixel proxy solves the global task and the local baseline does not; its ERF is larger; cutting
its long kernels to the centre tap brings it to chance; FGVis's deletion order is faithful (its deletion curve against
a random order's), points at the marks and flips the class deleting little, while the ConvFormer proxy,
which cannot solve the task, is scored beside it; the Hyena N-D proxy also
solves the global task and falls to chance without its long kernels) against what the analyzers measure,
and the summary reports each check, met or not.

The six trained proxies ship with the package (:mod:`.shipped`); they are used when they fit the current code and
configuration, else (and with ``retrain``) the proxies are trained as before, through the cache (resumable).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..engine import announce, content_key
from ..errors import HpxError
from ..images import model_mean_std, normalise
from ..inspection import long_filter_layers
from ..interventions import cut_short_convs
from ..models.proxies import HYENA_ND_PROXY, PROXY_NAMES
from ..storage import write_text_atomic
from .shipped import SHIPPED_DIR, Shipped, load_shipped, select_shipped
from .tasks import IMAGE_SIZE, TASKS, TaskBatch, sample_task, task_parameters
from .training import EVAL_SEED_OFFSET, TrainingConfig, load_or_train, task_accuracy

if TYPE_CHECKING:
    from ..analyzers.fgvis import FgvisResult
    from ..analyzers.scores import FaithfulnessResult, LocalisationResult
    from ..analyzers.truncation import TruncationResult

GLOBAL_TASK, LOCAL_TASK = "same-row", "stripes"
HPX_PROXY, CONV_PROXY = PROXY_NAMES[:2]
FGVIS_REFERENCE = "mean"
"""FGVis deletes towards the normalisation mean, the task's grey background: deleted pixels stay in the training
distribution (black ones do not; README, "Run the demo"); the deletion and insertion curves use the same reference."""
AUC_MARGIN = 0.1
"""How far FGVis's mean deletion AUC must lie below the random order's."""
DELETION_BUDGET = 0.1
"""FGVis must flip every image's class deleting at most this share of the image (the marks cover 3.1%)."""
HYENA_ND_FILTER_LR_SCALE = 0.01
"""The Hyena N-D proxy's filter networks learn at 1/100 of the rate (README, "Run the demo")."""


@dataclass(frozen=True)
class DemoSettings:
    """Training steps per task (the Hyena N-D proxy's own on the global task), images per analysis and the seed
    of everything."""

    global_steps: int = 800
    local_steps: int = 300
    hyena_nd_global_steps: int = 800
    erf_images: int = 32
    truncation_images: int = 256
    fgvis_images: int = 4
    seed: int = 0

    def training(self, model: str, task: str) -> TrainingConfig:
        """The training run of proxy ``model`` on ``task``: its steps, the Hyena N-D proxy's filter rate, the seed."""
        steps = self.local_steps if task != GLOBAL_TASK else (
            self.hyena_nd_global_steps if model == HYENA_ND_PROXY else self.global_steps)
        scale = HYENA_ND_FILTER_LR_SCALE if model == HYENA_ND_PROXY else 1.0
        return TrainingConfig(model, task, steps, seed=self.seed, filter_lr_scale=scale)


def write_task_folder(task: str, count: int, seed: int, root: Path) -> Path:
    """Held-out images of ``task`` as PNGs in an ImageFolder tree (class folders ``0_<name>``, ``1_<name>``) under
    ``root``, in a folder named by the content key of the task generator's parameters, the count, the seed and the
    code (:func:`..engine.content_key`). It is written beside and renamed into place when complete, so a folder
    that exists is complete and is reused."""
    from PIL import Image
    key = content_key({"task": task_parameters(task), "count": count, "seed": seed}, length=10)
    folder = root / f"{task}_eval_{count}_{key}"
    if folder.is_dir():
        return folder
    partial = root / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    batch = sample_task(task, count, EVAL_SEED_OFFSET + seed)
    pixels = (batch.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, batch.labels.tolist())):
        target = partial / f"{label}_{TASKS[task].classes[label]}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{index:05d}.png")
    try:
        os.rename(partial, folder)
    except OSError:  # another process put the same folder in place first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def mark_boxes(marks: Tensor) -> List[np.ndarray]:
    """Per image of ``marks`` (N, S, S bool) the boxes (K, 4) ``xmin, ymin, xmax, ymax`` (pixel edges) around its
    marks, one per connected mark."""
    from scipy.ndimage import find_objects, label
    return [np.array([[cols.start, rows.start, cols.stop, rows.stop] for rows, cols in find_objects(label(m)[0])],
                     dtype=np.float64) for m in marks.numpy()]


@dataclass
class ScoredExplanation:
    """FGVis on a proxy's same-row images and its scores: deletion and insertion curves, pointing on the marks."""

    explanation: "FgvisResult"
    faithfulness: "FaithfulnessResult"
    localisation: "LocalisationResult"


def explain_and_score(model: nn.Module, batch: TaskBatch, names: List[str], seed: int,
                      progress: bool = False) -> ScoredExplanation:
    """FGVis of ``model`` on ``batch`` (images (N, 3, S, S) in [0, 1] and their marks) deleting towards
    ``FGVIS_REFERENCE``, its deletion and insertion curves against the same reference
    (:func:`..analyzers.scores.faithfulness`) and the pointing games with the marks as boxes."""
    from ..analyzers.fgvis import FgvisSettings, fgvis
    from ..analyzers.scores import faithfulness, localisation
    images = normalise(batch.images, *model_mean_std(model))
    explanation = fgvis(model, images, seed=seed, settings=FgvisSettings(reference=FGVIS_REFERENCE), names=names,
                        progress=progress)
    curves = faithfulness(model, images, explanation, deletion_reference=FGVIS_REFERENCE,
                          insertion_start=FGVIS_REFERENCE, seed=seed, batch_size=128, progress=progress)
    return ScoredExplanation(explanation, curves, localisation(explanation, mark_boxes(batch.marks)))


def fgvis_numbers(scored: ScoredExplanation) -> Dict[str, List[float]]:
    """Per image: the AUCs of FGVis's and the random order's deletion and insertion curves, the pointing hit, the
    share of the map's mass on the marks, the share of the image deleted (mean of 1 - mask) and the flip."""
    faith, local = scored.faithfulness, scored.localisation
    numbers = {name: faith.arrays[name].tolist() for name in
               ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")}
    return {**numbers, "pointing": local.pointing.tolist(), "energy_pointing": local.energy_pointing.tolist(),
            "deleted_share": scored.explanation.maps.mean(axis=(1, 2)).tolist(),
            "flipped": [bool(r["success"]) for r in scored.explanation.records]}


def fgvis_checks(numbers: Dict[str, List[float]]) -> List[Tuple[str, float, str, bool]]:
    """The FGVis known answers of one proxy's :func:`fgvis_numbers`: (expectation, measured, shown, holds).

    The insertion curves are reported, not checked: they start from the plain grey image, which the task never
    shows, and what a proxy reads there is not set by the task (README, "Run the demo"). An image whose map is empty
    (flipped with nothing deleted) points nowhere and is left out of the pointing check, which needs at least half
    of the images."""
    mean = {name: float(np.mean(numbers[name])) for name in ("deletion_auc", "random_deletion_auc")}
    pointing = np.asarray(numbers["pointing"], dtype=float)
    scored = pointing[np.isfinite(pointing)]
    hits, empty = int(scored.sum()), len(pointing) - len(scored)
    worst = max(share if flipped else np.inf for share, flipped in zip(numbers["deleted_share"], numbers["flipped"]))
    return [
        (f"FGVis: deletion AUC below the random order's by >= {AUC_MARGIN}", mean["deletion_auc"],
         f"{mean['deletion_auc']:.3f} vs {mean['random_deletion_auc']:.3f}",
         mean["deletion_auc"] <= mean["random_deletion_auc"] - AUC_MARGIN),
        ("FGVis: the map's maximum on a mark (pointing game), every image", hits / max(len(scored), 1),
         f"{hits} of {len(scored)}" + (f" ({empty} map{'s' * (empty > 1)} empty)" if empty else ""),
         hits == len(scored) and 2 * len(scored) >= len(pointing)),
        (f"FGVis: class flipped with <= {_percent(DELETION_BUDGET)} of the image deleted, every image", worst,
         f"at most {_percent(worst)}" if np.isfinite(worst) else "not flipped", worst <= DELETION_BUDGET),
    ]


def _accuracy_under_truncation(model: nn.Module, size: float, images: int, seed: int) -> float:
    """Global-task accuracy with every long kernel cut to relative size ``size`` (all stages that have one; a
    ViT's blocks are all stage 0)."""
    from ..interventions import truncate_kernels
    stages = sorted({info.stage for info in long_filter_layers(model, IMAGE_SIZE)})
    with truncate_kernels(model, stages=stages, size=size, input_size=IMAGE_SIZE):
        return task_accuracy(model, GLOBAL_TASK, images, seed)


def _accuracy_by_cut(model: nn.Module, images: int, seed: int) -> Dict[str, float]:
    """Global-task accuracy with every long kernel cut to r = 0 (``"0.0"``) and r = 1 (``"1.0"``), and untruncated."""
    cut = {str(size): _accuracy_under_truncation(model, size, images, seed) for size in (0.0, 1.0)}
    cut["untruncated"] = task_accuracy(model, GLOBAL_TASK, images, seed)
    return cut


def load_proxies(cache_dir: Path, settings: DemoSettings, retrain: bool = False, shipped_dir: Path | str | None = None,
                 progress: bool = True) -> Tuple[Dict[Tuple[str, str], nn.Module], Dict[str, Dict[str, Any]]]:
    """The six trained proxies ((model, task) -> eval-mode model) and their records (``model/task`` -> training
    record with ``checkpoint``, ``source`` (``shipped``, ``cache`` or ``trained``) and ``cached`` (not trained now)).

    Shipped proxies (:mod:`.shipped`) that fit ``settings`` and the current code are loaded and their held-out accuracy
    measured again here (``accuracy``; the one measured when they were trained is ``accuracy_when_trained``); the
    others, or all with ``retrain``, come from :func:`.training.load_or_train` (the cache, else trained). When shipped
    proxies do not fit, one line says which and why."""
    configs = {(name, task): settings.training(name, task)
               for task in (GLOBAL_TASK, LOCAL_TASK) for name in PROXY_NAMES}
    shipped: Dict[Tuple[str, str], Shipped] = {}
    if not retrain:
        shipped, message = select_shipped(configs, SHIPPED_DIR if shipped_dir is None else shipped_dir)
        if message:
            announce(message)
    models: Dict[Tuple[str, str], nn.Module] = {}
    records: Dict[str, Dict[str, Any]] = {}
    for (name, task), config in configs.items():
        if (name, task) in shipped:
            found = shipped[name, task]
            model = load_shipped(found, config.seed)
            record = {**found.record, "config": found.meta["training"],
                      "accuracy_when_trained": found.record["accuracy"],
                      "accuracy": task_accuracy(model, task, config.eval_images, config.seed),
                      "checkpoint": str(found.path), "source": "shipped", "cached": True}
        else:
            model, record, checkpoint = load_or_train(config, cache_dir, progress)
            record = {**record, "checkpoint": str(checkpoint), "source": "cache" if record["cached"] else "trained"}
        models[name, task] = model
        records[f"{name}/{task}"] = record
    return models, records


def shipped_proxy(name: str, task: str, settings: DemoSettings = DemoSettings()) -> nn.Module:
    """The shipped proxy ``name`` trained on ``task`` as an eval-mode model; a one-line error when it does not fit the
    current code and ``settings``."""
    found, _ = select_shipped({(name, task): settings.training(name, task)})
    if (name, task) not in found:
        raise HpxError(f"the shipped proxy {name}/{task} does not fit this code and these settings; train it with "
                       "`hpx-analyze demo --retrain`, or ship new ones with `python -m hpx_analysis.demo.ship`")
    return load_shipped(found[name, task], settings.seed)


def run_demo(out: Path | str, cache_dir: Path | str, settings: DemoSettings = DemoSettings(),
             progress: bool = True, retrain: bool = False, shipped_dir: Path | str | None = None) -> Dict[str, Any]:
    """Load the shipped proxies (or train them: ``retrain``, or when they do not fit; :func:`load_proxies`), run
    ERF, kernels, coverage, truncation and FGVis (scored) on them and write the gallery (PNG + PDF + metadata per figure),
    ``summary.md`` and ``summary.json`` into ``out``. ``cache_dir`` holds trained proxies and evaluation images;
    ``shipped_dir`` (default the package's) the shipped proxies. Returns the summary numbers."""
    from ..analyzers.coverage import compute_coverage
    from ..analyzers.erf import ERFResult, effective_receptive_field
    from ..analyzers.kernels import compute_kernels
    from ..analyzers.scores import score_table
    from ..analyzers.truncation import truncation_sweep
    from ..datasets import labelled_images
    from ..plotting import save_figure
    from ..plotting.coverage import plot_coverage
    from ..plotting.erf import save_erf_figure
    from ..plotting.explain import plot_explanations
    from ..plotting.kernels import plot_kernels
    from ..plotting.scores import plot_scores
    from ..plotting.truncation import plot_truncation
    from .plots import plot_accuracies, plot_task_examples

    out, cache_dir = Path(out), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = settings.seed
    models, records = load_proxies(cache_dir, settings, retrain, shipped_dir, progress)
    written: List[Path] = []
    written += save_figure(plot_task_examples({t: sample_task(t, 4, EVAL_SEED_OFFSET + seed + 7) for t in TASKS}),
                           out / "tasks", metadata={"tasks": {t: asdict(v) for t, v in TASKS.items()}})
    accuracy = {name: {task: records[f"{name}/{task}"]["accuracy"] for task in TASKS} for name in PROXY_NAMES}
    written += save_figure(plot_accuracies(accuracy), out / "accuracy", metadata={"training": records})

    hpx = models[HPX_PROXY, GLOBAL_TASK]
    erf_inputs = normalise(sample_task(GLOBAL_TASK, settings.erf_images, EVAL_SEED_OFFSET + seed + 1).images,
                           *model_mean_std(hpx))
    erf = ERFResult.combine([effective_receptive_field(models[name, GLOBAL_TASK], erf_inputs, input_size=IMAGE_SIZE,
                                                       label=name, progress=progress) for name in PROXY_NAMES])
    written += [*erf.save_files(out / "erf"), *save_erf_figure(erf, out / "erf")]

    hyena_nd = models[HYENA_ND_PROXY, GLOBAL_TASK]
    for stem, model in (("kernels", hpx), ("kernels_hyena_nd", hyena_nd)):
        kernels = compute_kernels(model, input_size=IMAGE_SIZE)
        written += [*kernels.save_files(out / stem), *save_figure(plot_kernels(kernels), out / stem, metadata=kernels.meta)]
    coverage = [compute_coverage(models[name, GLOBAL_TASK], input_size=IMAGE_SIZE) for name in PROXY_NAMES]
    written += save_figure(plot_coverage(coverage), out / "coverage",
                           metadata={"results": [c.meta for c in coverage]})

    data = write_task_folder(GLOBAL_TASK, settings.truncation_images, seed, cache_dir)
    sweeps = {}
    for stem, model in (("truncation", hpx), ("truncation_hyena_nd", hyena_nd)):
        sweeps[stem] = truncation_sweep(model, labelled_images(data), None, None, input_size=IMAGE_SIZE, batch_size=64,
                                        n_resamples=500, seed=seed, progress=progress)
        written += [*sweeps[stem].save_files(out / stem), *plot_truncation(sweeps[stem], out / stem)]
    cut, hyena_nd_cut = (_accuracy_by_cut(model, settings.truncation_images, seed) for model in (hpx, hyena_nd))
    short_cut = {}
    for stage in range(len(hpx.stages)):
        with cut_short_convs(hpx, [stage]):
            short_cut[f"S{stage + 1}"] = task_accuracy(hpx, GLOBAL_TASK, settings.truncation_images, seed)

    batch = sample_task(GLOBAL_TASK, 64, EVAL_SEED_OFFSET + seed + 2)
    chosen = torch.nonzero(batch.labels == 1).flatten()[:settings.fgvis_images]
    shown = TaskBatch(batch.images[chosen], batch.labels[chosen], batch.marks[chosen])
    scored = {name: explain_and_score(models[name, GLOBAL_TASK], shown, [f"same-row #{int(i)}" for i in chosen], seed,
                                      progress) for name in (HPX_PROXY, CONV_PROXY)}
    written += [*scored[HPX_PROXY].explanation.save_files(out / "fgvis"),
                *plot_explanations([s.explanation for s in scored.values()], out / "fgvis")]
    table = score_table([(name, "fgvis", s.faithfulness, s.localisation) for name, s in scored.items()], seed=seed)
    written += [*table.save_files(out / "scores"), *plot_scores(table, out / "scores")]

    summary = {
        "accuracy": accuracy,
        "erf_area_ratio_t0.5": {entry["label"]: entry["area_ratios"]["0.5"] for entry in erf.meta["models"]},
        "truncation_all_stages": cut,
        "hyena_nd_truncation_all_blocks": hyena_nd_cut,
        "short_convs_cut_to_centre": short_cut,
        "truncation_per_stage": _per_stage(sweeps["truncation"]),
        "hyena_nd_truncation_per_stage": _per_stage(sweeps["truncation_hyena_nd"]),
        "coverage_mean": {c.model_name: [round(row["mean"], 4) for row in c.rows()] for c in coverage},
        "fgvis": {name: fgvis_numbers(s) for name, s in scored.items()},
        "mark_area_share": float(shown.marks.float().mean()),
        "training": records, "settings": asdict(settings),
    }
    summary["known_answers"] = known_answers(summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    summary["written"] = [str(p) for p in written + [out / "summary.json", out / "summary.md"]]
    return summary


def _per_stage(sweep: "TruncationResult") -> Dict[str, Dict[str, float]]:
    """A truncation sweep's top-1 accuracy per swept group (``S1``, ...) and relative size r (text)."""
    return {group: dict(zip(map(str, sweep.arrays["sizes"]), map(float, row)))
            for group, row in zip(sweep.groups, sweep.arrays["top1"])}


def known_answers(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The task design's predictions, each with the measured numbers and whether it holds."""
    acc = summary["accuracy"]
    erf = summary["erf_area_ratio_t0.5"]
    cut = summary["truncation_all_stages"]
    hyena_nd_cut = summary["hyena_nd_truncation_all_blocks"]
    checks = [
        ("HyenaPixel proxy solves the global task (>= 90%)", acc[HPX_PROXY][GLOBAL_TASK],
         acc[HPX_PROXY][GLOBAL_TASK] >= 0.9),
        ("local baseline does markedly worse on it (>= 20 points lower)", acc[CONV_PROXY][GLOBAL_TASK],
         acc[CONV_PROXY][GLOBAL_TASK] <= acc[HPX_PROXY][GLOBAL_TASK] - 0.2),
        ("all proxies solve the local task (>= 90%)", min(acc[name][LOCAL_TASK] for name in PROXY_NAMES),
         min(acc[name][LOCAL_TASK] for name in PROXY_NAMES) >= 0.9),
        ("HyenaPixel ERF area ratio at t = 0.5 larger", erf[HPX_PROXY],
         (erf[HPX_PROXY] or 0.0) > (erf[CONV_PROXY] or 0.0)),
        ("long kernels cut to the centre tap (r = 0): global task near chance (<= 60%)", cut["0.0"],
         cut["0.0"] <= 0.6),
        ("Hyena N-D proxy solves the global task (>= 90%)", acc[HYENA_ND_PROXY][GLOBAL_TASK],
         acc[HYENA_ND_PROXY][GLOBAL_TASK] >= 0.9),
        ("its long kernels cut to the centre tap (r = 0): global task near chance (<= 60%)", hyena_nd_cut["0.0"],
         hyena_nd_cut["0.0"] <= 0.6),
    ]
    shown = [(text, value, _percent(value), holds) for text, value, holds in checks]
    shown[5:5] = fgvis_checks(summary["fgvis"][HPX_PROXY])
    return [{"expectation": text, "measured": float(value) if value is not None else None, "shown": text_value,
             "holds": bool(holds)} for text, value, text_value, holds in shown]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def fgvis_markdown(summary: Dict[str, Any]) -> List[str]:
    """The FGVis scores of the explained proxies side by side, and whether each proxy meets the FGVis checks."""
    numbers = summary["fgvis"]
    count = len(next(iter(numbers.values()))["pointing"])
    lines = ["", f"## FGVis scores on {count} same-row images", "",
             f"Deleting towards the grey background (the normalisation mean; the marks cover "
             f"{_percent(summary['mark_area_share'])} of the image). AUCs of the probability of the explained class "
             "(mean over images; the random pixel order's in brackets; insertion starts from the plain grey image and is "
             "reported, not checked); the map's mass on the marks (energy pointing); "
             "the largest share of an image deleted at the flip; the FGVis checks above that the proxy meets.", "",
             "| proxy | deletion AUC | insertion AUC | pointing hits | mass on marks | deleted at flip | checks met |",
             "|---|---|---|---|---|---|---|"]
    for name, values in numbers.items():
        mean = {key: float(np.nanmean(v)) for key, v in values.items() if key != "flipped"}
        checks = fgvis_checks(values)
        lines.append(
            f"| {name} | {mean['deletion_auc']:.3f} ({mean['random_deletion_auc']:.3f}) | {mean['insertion_auc']:.3f} "
            f"({mean['random_insertion_auc']:.3f}) | {checks[1][2]} | "
            f"{_percent(mean['energy_pointing'])} | {_percent(max(values['deleted_share']))} | "
            f"{sum(holds for *_, holds in checks)} of {len(checks)} |")
    return lines


def summary_markdown(summary: Dict[str, Any]) -> str:
    """The demo's numbers as a short markdown report."""
    acc = summary["accuracy"]
    erf = summary["erf_area_ratio_t0.5"]
    cut = summary["truncation_all_stages"]
    hyena_nd_cut = summary["hyena_nd_truncation_all_blocks"]
    lines = [
        "# hpx-analyze demo: proxy models with known answers", "",
        f"Global task `{GLOBAL_TASK}`: {TASKS[GLOBAL_TASK].description}. "
        f"Local task `{LOCAL_TASK}`: {TASKS[LOCAL_TASK].description}. Chance is 50%; held-out accuracy:", "",
        "| model | parameters | same-row (global) | stripes (local) |", "|---|---|---|---|",
    ]
    for name in PROXY_NAMES:
        params = summary["training"][f"{name}/{GLOBAL_TASK}"]["parameters"]
        lines.append(f"| {name} | {params} | {_percent(acc[name][GLOBAL_TASK])} | {_percent(acc[name][LOCAL_TASK])} |")
    by_source: Dict[str, List[str]] = {}
    for pair, record in summary["training"].items():
        by_source.setdefault(record.get("source", "cache"), []).append(pair)
    origin = {"shipped": "shipped with the package (`--retrain` trains them afresh)",
              "cache": "trained earlier, from the cache", "trained": "trained in this run"}
    lines += ["", "Proxies " + "; ".join(
        f"{origin[source]}: {'all six' if len(pairs) == len(summary['training']) else ', '.join(pairs)}"
        for source, pairs in by_source.items()) + ". Each is an ordinary checkpoint (`summary.json` names all six), "
        f"e.g. `{summary['training'][f'{HPX_PROXY}/{GLOBAL_TASK}']['checkpoint']}`."]
    lines += [
        "", "## What the analyses measure", "",
        "- ERF area ratio at t = 0.5: " + ", ".join(f"{name} {_percent(erf[name])}" for name in PROXY_NAMES) + ".",
        f"- Every long kernel of {HPX_PROXY} cut to relative size r: same-row accuracy {_percent(cut['0.0'])} at "
        f"r = 0 (centre tap), {_percent(cut['1.0'])} at r = 1, {_percent(cut['untruncated'])} untruncated.",
        f"- Every long kernel of {HYENA_ND_PROXY} (all three blocks) cut to r: same-row accuracy "
        f"{_percent(hyena_nd_cut['0.0'])} at r = 0, {_percent(hyena_nd_cut['1.0'])} at r = 1, "
        f"{_percent(hyena_nd_cut['untruncated'])} untruncated (r swept in the `truncation_hyena_nd` figure).",
        "- One stage at a time (the `truncation` figure), r = 0: " + "; ".join(
            f"{stage} {_percent(row['0.0'])}" for stage, row in summary["truncation_per_stage"].items()) + ".",
        "- The gated short path instead: the 5x5 depthwise kernels of one stage cut to their centre tap (long "
        "kernels untouched): " + "; ".join(f"{stage} {_percent(value)}"
                                          for stage, value in summary["short_convs_cut_to_centre"].items()) + ".",
        "", "## Known answers", "", "| expectation | measured | holds |", "|---|---|---|",
    ]
    lines += [f"| {check['expectation']} | {check['shown']} | {'yes' if check['holds'] else 'no'} |"
              for check in summary["known_answers"]]
    lines += fgvis_markdown(summary)
    lines += ["", "Figures: `tasks`, `accuracy`, `erf`, `kernels`, `kernels_hyena_nd`, `coverage`, `truncation`, "
              "`truncation_hyena_nd`, `fgvis`, `scores` (.png and .pdf, metadata in .figure.json).", ""]
    return "\n".join(lines)
