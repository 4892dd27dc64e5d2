"""``hpx-analyze demo``: proxy models trained offline on tasks with known answers, every analyzer run on them."""

from __future__ import annotations

from pathlib import Path

import typer
from typing_extensions import Annotated

from .options import DEFAULT_SEED, Seed, report_written, writable_folder

DEFAULT_DEMO_OUT = Path("figures") / "demo"
DEFAULT_CACHE = Path.home() / ".cache" / "hpx-analysis" / "demo"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", callback=writable_folder,
                                      help="Gallery folder.")] = DEFAULT_DEMO_OUT,
    cache: Annotated[Path, typer.Option("--cache", help="Trained proxies (when not the shipped ones) and evaluation "
                                        "images; a rerun with the same settings reuses them.")] = DEFAULT_CACHE,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the proxies from scratch (through --cache: "
                                          "each is cached as soon as it is trained, so an interrupted run resumes) "
                                          "instead of loading the ones shipped with the package.")] = False,
    global_steps: Annotated[int, typer.Option("--global-steps", min=1, help="Training steps on the global "
                                              "same-row task.")] = 800,
    local_steps: Annotated[int, typer.Option("--local-steps", min=1, help="Training steps on the local stripes "
                                             "task.")] = 300,
    hyena_nd_steps: Annotated[int, typer.Option("--hyena-nd-steps", min=1, help="Training steps of the Hyena N-D "
                                                "proxy on the global same-row task.")] = 800,
    seed: Seed = DEFAULT_SEED,
) -> None:
    """Run ERF, kernels, coverage, truncation and FGVis on a HyenaPixel, a ConvFormer and a Hyena N-D proxy trained
    on synthetic tasks with known answers, and check the answers. Offline. The trained proxies ship with the package
    (under a minute on 2 CPU cores); --retrain, other steps or another seed, or code that changed what they were
    trained with (one line says so) train them instead: about 4-7 minutes on 2 CPU cores, cached in --cache."""
    from hpx_analysis.demo.pipeline import DemoSettings, run_demo

    summary = run_demo(out, cache, DemoSettings(global_steps=global_steps, local_steps=local_steps,
                                                hyena_nd_global_steps=hyena_nd_steps, seed=seed), retrain=retrain)
    report_written(summary["written"])
    typer.echo((Path(out) / "summary.md").read_text())
