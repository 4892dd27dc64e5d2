"""Result objects: every analyzer returns one; it saves and loads itself as ``<stem>.npz`` + ``<stem>.json``.

The ``.npz`` holds the arrays, the ``.json`` the metadata (model, weights source and hash, inputs,
options, library versions) and the scalar results, so a figure can be redrawn without recomputing.
The two are written as a pair: the ``.npz`` first, each file atomically (``storage.atomic_output``), the
``.json`` last, naming the ``.npz`` and its SHA-256, so a reader never takes arrays of one save with the
metadata of another (an interrupted save leaves the previous pair or a mismatch that :meth:`Result.load` refuses).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, overload

import numpy as np

from .errors import HpxError
from .provenance import provenance_versions
from .storage import write_bytes_atomic, write_text_atomic

R = TypeVar("R", bound="Result")


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: Path | str) -> Path:
    """Flat records (the first one's keys are the columns) as a CSV file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def model_metadata(model: Any) -> Dict[str, Any]:
    """Provenance of a model loaded with :func:`hpx_analysis.models.zoo.load_model`."""
    provenance = dict(getattr(model, "hpx_provenance", {}) or {})
    provenance.setdefault("model", type(model).__name__)
    return provenance


def to_jsonable(value: Any, nonfinite_as_text: bool = False) -> Any:
    """``value`` with numpy scalars and arrays, tuples and paths made JSON types; infinities and NaN become null, or
    with ``nonfinite_as_text`` the text ``"inf"``, ``"-inf"``, ``"nan"`` (keys: inf and -inf must differ)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, nonfinite_as_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, nonfinite_as_text) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return str(float(value)) if nonfinite_as_text else None
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), nonfinite_as_text)
    if isinstance(value, Path):
        return str(value)
    return value


class ArrayField:
    """A read-only attribute of a result: the array stored in its ``arrays`` under the attribute's own name
    (``deletion = ArrayField()`` reads ``arrays["deletion"]``)."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, result: None, owner: type) -> "ArrayField": ...

    @overload
    def __get__(self, result: "Result", owner: type) -> np.ndarray: ...

    def __get__(self, result: Optional["Result"], owner: type) -> Any:
        return self if result is None else result.arrays[self.name]

    def __set__(self, result: "Result", value: Any) -> None:
        raise AttributeError(f"'{self.name}' is read from the result's arrays; set arrays['{self.name}'] instead")


@dataclass
class Result:
    """Base of all analyzer results: ``arrays`` (name -> ndarray) and ``meta`` (JSON-serialisable).

    Subclasses set ``kind`` (the analyzer's name) and add typed accessors over arrays/meta (:class:`ArrayField`
    for an array read as it is stored).
    """

    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "result"

    def save(self, stem: Path | str) -> Path:
        """Write ``<stem>.npz`` and then ``<stem>.json`` (module docstring); returns the ``.npz`` path."""
        stem = Path(stem)
        npz = stem.with_suffix(".npz")
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in self.arrays.items()})
        write_bytes_atomic(npz, buffer.getvalue())
        meta = {"kind": self.kind, "versions": provenance_versions(), **self.meta,
                "arrays_file": {"name": npz.name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}}
        write_text_atomic(stem.with_suffix(".json"), json.dumps(to_jsonable(meta), indent=2, sort_keys=False))
        return npz

    def save_files(self, stem: Path | str) -> List[Path]:
        """:meth:`save`, returning both written files: ``[<stem>.npz, <stem>.json]``."""
        npz = self.save(stem)
        return [npz, npz.with_suffix(".json")]

    @classmethod
    def load(cls: Type[R], path: Path | str) -> R:
        """Read a result written by :meth:`save` (``path``: the .npz, the .json or the stem)."""
        stem = Path(path)
        if stem.suffix in (".npz", ".json"):
            stem = stem.with_suffix("")
        npz, meta_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
        if not npz.is_file() or not meta_path.is_file():
            raise HpxError(f"no saved result at {stem} (need {npz.name} and {meta_path.name})")
        data = npz.read_bytes()
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise HpxError(f"{meta_path} is not a result's metadata ({type(err).__name__})") from None
        pair = meta.get("arrays_file")
        if pair is not None and (pair.get("name") != npz.name or pair.get("sha256") != hashlib.sha256(data).hexdigest()):
            raise HpxError(f"{npz.name} does not belong to {meta_path.name} (another or an interrupted save); "
                           "recompute the result")
        if cls.kind != "result" and meta.get("kind") != cls.kind:
            raise HpxError(f"{npz} holds a '{meta.get('kind')}' result, not '{cls.kind}'")
        with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        return cls(arrays=arrays, meta=meta)

    def get(self, key: str, default: Optional[Any] = None) -> Any:
        return self.meta.get(key, default)
