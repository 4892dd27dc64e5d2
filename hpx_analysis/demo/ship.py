"""``python -m hpx_analysis.demo.ship``: regenerate the demo proxies shipped with the package (:mod:`.shipped`).

Run it after an edit of the code or configuration the trained weights depend on (:data:`.shipped.WEIGHTS_FILES`,
:data:`.shipped.WEIGHTS_FUNCTIONS`, the demo's training settings). It trains the six proxies as
``hpx-analyze demo --retrain`` does (through the same cache, so an interrupted run resumes), writes them with their
metadata to a staging folder, runs the whole demo on them and moves them into ``hpx_analysis/demo/proxies/`` only when
every known answer holds; commit the six files. ``--verify`` checks the shipped files (present, intact, loading
strictly, keyed as the current code would train them) without training; CI runs it on the installed wheel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import HpxError
from ..models.proxies import PROXY_NAMES
from .pipeline import DemoSettings, run_demo
from .shipped import REGENERATE, SHIPPED_DIR, load_shipped, mismatch, weights_code, weights_fingerprint, write_shipped
from .tasks import TASKS
from .training import load_or_train

DEFAULT_CACHE = Path.home() / ".cache" / "hpx-analysis" / "demo"


def verify(folder: Path | str = SHIPPED_DIR) -> List[str]:
    """Problems of the shipped proxies against the current code and the demo's default settings (empty: none):
    each present, readable, intact (digest), loading strictly and keyed as the current code would train it."""
    settings = DemoSettings()
    problems = []
    code = weights_code()
    for task in TASKS:
        for name in PROXY_NAMES:
            shipped, why = mismatch(settings.training(name, task), folder, code)
            if shipped is None:
                problems.append(f"{name}/{task}: {why}")
                continue
            try:
                load_shipped(shipped, settings.seed)
            except HpxError as err:
                problems.append(f"{name}/{task}: {err}")
    return problems


def regenerate(cache: Path, folder: Path = SHIPPED_DIR, check: bool = True, out: Optional[Path] = None,
               progress: bool = True) -> Dict[str, Any]:
    """Train the six proxies with the demo's default settings (through ``cache``, as ``--retrain``), write them
    with their metadata to a staging folder, run the whole demo on them (``check``) and move them into ``folder``
    only when every known answer holds. Returns the demo's summary (or the records when not ``check``)."""
    settings = DemoSettings()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        records = {}
        for task in TASKS:
            for name in PROXY_NAMES:
                config = settings.training(name, task)
                model, record, _ = load_or_train(config, cache, progress)
                write_shipped(config, model, record, staging)
                records[f"{name}/{task}"] = record
        summary: Dict[str, Any] = {"training": records}
        if check:
            with tempfile.TemporaryDirectory() as scratch:
                summary = run_demo(out or Path(scratch) / "gallery", Path(scratch) / "cache", settings,
                                   progress=progress, shipped_dir=staging)
            sources = {record["source"] for record in summary["training"].values()}
            failed = [c["expectation"] for c in summary["known_answers"] if not c["holds"]]
            problems = [f"known answers do not hold: {'; '.join(failed)}"] if failed else []
            if sources != {"shipped"}:
                problems.append(f"the check did not load them as shipped ({', '.join(sorted(sources))})")
            if problems:
                raise HpxError("not shipped: " + "; ".join(problems))
        for path in sorted(staging.glob("*.safetensors")):
            os.replace(path, folder / path.name)
        return summary
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Train the demo's six proxies (or reuse them from "
                                     "the cache), check every known answer on them and ship them with the package.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="training cache (as hpx-analyze demo's)")
    parser.add_argument("--to", type=Path, default=SHIPPED_DIR, help="folder of the shipped proxies")
    parser.add_argument("--out", type=Path, default=None, help="also keep the check's gallery here")
    parser.add_argument("--no-check", action="store_true", help="ship without running the demo's known answers")
    parser.add_argument("--verify", action="store_true", help="only check the shipped proxies; exit 1 on a problem")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            problems = verify(args.to)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if not problems:
                print(f"the {len(PROXY_NAMES) * len(TASKS)} shipped demo proxies in {args.to} fit this code "
                      f"(weights fingerprint {weights_fingerprint()[:12]})")
            return 1 if problems else 0
        summary = regenerate(args.cache, args.to, check=not args.no_check, out=args.out)
    except HpxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for pair, record in summary["training"].items():
        print(f"{pair}: accuracy {record['accuracy']:.3f}, trained in {record.get('seconds', '?')} s")
    for check in summary.get("known_answers", []):
        print(f"{'holds' if check['holds'] else 'FAILS'}: {check['expectation']} ({check['measured']})")
    print(f"wrote {len(summary['training'])} proxies to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
