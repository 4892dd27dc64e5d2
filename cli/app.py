"""Typer app behind the ``hpx-analyze`` console script.

Commands import the library inside their bodies, so ``hpx-analyze --help`` stays fast.
User errors (:class:`hpx_analysis.errors.HpxError`) print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from . import coverage_cmd, erf_cmd, inspect_cmd, kernels_cmd, models_cmd
from . import truncate_cmd
from . import demo_cmd, explain_cmd

os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI writes figures to files; the library leaves the backend alone

app = typer.Typer(
    name="hpx-analyze",
    help="Analyses of HyenaPixel models and their comparison backbones: effective receptive fields, "
         "learned kernels, filter-size coverage, window truncation, FGVis explanations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click errors: the offending option and value on one greppable line
    add_completion=False,
)
demo_cmd.register(app)
models_cmd.register(app)
truncate_cmd.register(app)
erf_cmd.register(app)
inspect_cmd.register(app)
kernels_cmd.register(app)
coverage_cmd.register(app)
explain_cmd.register(app)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version
        typer.echo(f"hpx-analyze {version('hpx-analysis')}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Show the version and exit.")] = None) -> None:
    """hpx-analyze: analysis and interpretability for HyenaPixel vision models."""


def run() -> None:
    """The ``hpx-analyze`` console script: :func:`main` in a process that keeps freed memory for reuse
    (:func:`hpx_analysis.devices.keep_freed_memory`; not for ``--help``/``--version``, which stay free of torch)."""
    if len(sys.argv) > 1 and not {"--help", "--version"} & set(sys.argv[1:]):
        from hpx_analysis.devices import keep_freed_memory
        keep_freed_memory()
    main()


INTERRUPTED = "interrupted; partial results already saved are kept and a rerun resumes"


def main() -> None:
    """Run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except SystemExit as exit_:
        if exit_.code == 130:  # typer turns Ctrl-C inside a command into a silent exit 130
            typer.echo(INTERRUPTED, err=True)
        raise
    except Exception as err:  # HpxError is user-facing; others keep their traceback for bug reports
        from hpx_analysis.errors import HpxError
        if isinstance(err, HpxError):
            typer.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        raise
