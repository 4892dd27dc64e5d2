"""What a result depends on besides its model and inputs: the package version, a fingerprint of the package's
code and the versions of the libraries that compute it.

The version comes from one place, the installed package's metadata (``pyproject.toml``). The code fingerprint is a
SHA-256 over every ``.py`` file of the package (relative path and bytes), computed once per process: any edit of
the library, a fix of an analyzer included, gives another fingerprint, so cached runs keyed on it are recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as metadata
import marshal
import platform
from pathlib import Path
from typing import Callable, Dict, Mapping, Sequence, Union

DISTRIBUTION = "hpx-analysis"
KEYED_LIBRARIES = ("torch", "timm", "captum")
"""Libraries whose versions are part of every run key: they compute the numbers."""
RECORDED_LIBRARIES = (DISTRIBUTION, "torch", "timm", "captum", "numpy", "scipy", "matplotlib")
"""Libraries whose versions are recorded in every saved result."""


@functools.lru_cache(maxsize=None)
def package_version() -> str:
    """The installed version of hpx-analysis (``"unknown"`` for a source tree that was never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def source_fingerprint(root: Path) -> str:
    """SHA-256 over the ``.py`` files under ``root``, in sorted order: each file's relative path and content, both
    length-prefixed so no two trees share a digest by shifting bytes between names and contents."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
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


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """:func:`source_fingerprint` of the installed ``hpx_analysis`` package, computed once per process."""
    return source_fingerprint(Path(__file__).parent)


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
           "parts_fingerprint", "code_fingerprint", "function_fingerprint", "library_versions", "provenance_versions"]
