"""What a result depends on besides its model and inputs: the package version, a fingerprint of the package's
code and the versions of the libraries that compute it.

The version comes from one place, the installed package's metadata (``pyproject.toml``). The code fingerprint is a
SHA-256 over every source file of the package, ``.py`` and the native kernels' ``.c`` (relative path and bytes),
taken once per process, when ``hpx_analysis`` is imported: any edit of the library, a fix of an analyzer included,
gives another fingerprint, so cached runs keyed on it are recomputed. Run keys take it through
:func:`checked_code_fingerprint`, which refuses when the files changed after the import (the process may run a mix
of old and new code).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as metadata
import marshal
import platform
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import HpxError

DISTRIBUTION = "hpx-analysis"
KEYED_LIBRARIES = ("torch", "torchvision", "timm", "captum", "numpy", "scipy", "pillow")
"""Libraries whose versions are part of every run key: they compute the numbers (Pillow and torchvision decode,
resize and blur the images; numpy draws random orders and seeds; scipy fits and filters)."""
RECORDED_LIBRARIES = (DISTRIBUTION, "torch", "torchvision", "timm", "captum", "numpy", "scipy", "pillow", "matplotlib")
"""Libraries whose versions are recorded in every saved result."""


@functools.lru_cache(maxsize=None)
def package_version() -> str:
    """The installed version of hpx-analysis (``"unknown"`` for a source tree that was never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


SOURCE_SUFFIXES = (".py", ".c")
"""What counts as the package's code: its Python modules and the C source of its native kernels."""


def _source_files(root: Path) -> List[Path]:
    """The source files (:data:`SOURCE_SUFFIXES`) under ``root``, sorted; hidden names (an editor's ``.#module.py``
    lock links) left out."""
    return sorted(path for path in root.rglob("*") if path.suffix in SOURCE_SUFFIXES
                  and not path.name.startswith(".") and path.is_file())


def source_fingerprint(root: Path) -> str:
    """SHA-256 over the source files under ``root`` (:data:`SOURCE_SUFFIXES`), in sorted order: each file's relative
    path and content, both length-prefixed so no two trees share a digest by shifting bytes between names and
    contents."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        for part in (path.relative_to(root).as_posix().encode(), path.read_bytes()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def parts_fingerprint(parts: Mapping[str, Union[bytes, str]]) -> str:
    """SHA-256 over named parts (a chosen set of files or function sources), in sorted name order, each name and
    content length-prefixed as in :func:`source_fingerprint`: a fingerprint of exactly the code something depends on
    (the shipped demo proxies: :mod:`hpx_analysis.demo.ship`), unchanged by edits anywhere else."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        content = parts[name]
        for part in (name.encode(), content.encode() if isinstance(content, str) else content):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _source_stats(root: Path) -> Dict[str, Tuple[int, int]]:
    """(mtime_ns, size) of each file of :func:`_source_files`, by relative path."""
    stats = {path.relative_to(root).as_posix(): path.stat() for path in _source_files(root)}
    return {name: (stat.st_mtime_ns, stat.st_size) for name, stat in stats.items()}


class _LoadedSource:
    """The package's source as this process loaded it: its fingerprint, taken when ``hpx_analysis`` is imported, and
    the files' times and sizes then."""

    root = Path(__file__).parent
    stats: Optional[Dict[str, Tuple[int, int]]] = None
    fingerprint = ""


def code_fingerprint() -> str:
    """:func:`source_fingerprint` of the installed ``hpx_analysis`` package as this process loaded it (taken once, at
    ``import hpx_analysis``)."""
    if _LoadedSource.stats is None:
        _LoadedSource.stats = _source_stats(_LoadedSource.root)
        _LoadedSource.fingerprint = source_fingerprint(_LoadedSource.root)
    return _LoadedSource.fingerprint


def checked_code_fingerprint() -> str:
    """:func:`code_fingerprint`, refused (HpxError) when the package's files have changed since this process loaded
    them (an update, an edit, a reload): modules imported before and after would then run different code under one
    fingerprint, and a result keyed on it could be served to the other code. Files touched but equal pass."""
    fingerprint = code_fingerprint()
    stats = _source_stats(_LoadedSource.root)
    if stats != _LoadedSource.stats:
        if source_fingerprint(_LoadedSource.root) != fingerprint:
            changed = sorted(set(stats.items()) ^ set((_LoadedSource.stats or {}).items()))
            names = ", ".join(sorted({name for name, _ in changed})[:3])
            raise HpxError(f"hpx_analysis's source changed since this process loaded it ({names}); restart Python "
                           "so its results are keyed on the code that computes them")
        _LoadedSource.stats = stats
    return fingerprint


def function_fingerprint(function: Callable[..., object]) -> str:
    """SHA-256 of a Python function as written: its name, its compiled code (nested functions included), its
    defaults and the values it closes over (by ``repr``), so a user-defined step that changes changes its key."""
    digest = hashlib.sha256(f"{function.__module__}.{function.__qualname__}".encode())
    digest.update(marshal.dumps(function.__code__))
    digest.update(repr((function.__defaults__, function.__kwdefaults__)).encode())
    for cell in function.__closure__ or ():
        digest.update(repr(cell.cell_contents).encode())
    return digest.hexdigest()


def library_versions(names: Sequence[str] = RECORDED_LIBRARIES) -> Dict[str, str]:
    """Python's version and each installed library's of ``names`` (missing ones left out)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance_versions() -> Dict[str, str]:
    """What saved results and figures record of the software: :func:`library_versions` and the code fingerprint."""
    return {**library_versions(), "hpx-analysis code": code_fingerprint()}


__all__ = ["DISTRIBUTION", "KEYED_LIBRARIES", "RECORDED_LIBRARIES", "package_version", "source_fingerprint",
           "parts_fingerprint", "code_fingerprint", "checked_code_fingerprint", "function_fingerprint",
           "library_versions", "provenance_versions"]
