"""Fault injection for the run store, the way storage engines test "nothing lost, nothing doubled" (issue 20).

Real analyses (ERF, a truncation sweep, FGVis on the HyenaPixel demo proxy with random weights, small images) run in
child processes with resume on and a save after every batch. The harness

- interrupts them at random instants, by SIGINT (Python's handler runs: the run saves and stops) and by SIGKILL
  (nothing runs), and resumes until the run finishes;
- damages the saved state between an interrupt and the resume (empty, truncated at a random length, random bytes,
  or the file of another run key), expecting a one-line warning and a fresh start;
- starts two processes on one run key at once, expecting the second to wait and reuse the first's result;

and checks that every final result equals an uninterrupted run's: counts and records identical, maps to 1e-6.
Children come from a fork server that has imported torch once, so an interrupt costs milliseconds, not an import.

``python3 -m tests.fault_harness`` prints the counts (the README's reliability section);
``tests/test_fault_injection.py`` runs it in CI.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ANALYSES = ("erf", "truncation", "fgvis")
DAMAGES = ("empty", "truncated", "random-bytes", "other-key")
IMAGES = 16
IMAGE_SIDE = 48
PRELOAD = ["torch", "timm", "hpx_analysis.models", "hpx_analysis.analyzers.erf", "hpx_analysis.analyzers.truncation",
           "hpx_analysis.analyzers.fgvis", "hpx_analysis.datasets"]


def write_inputs(folder: Path, seed: int = 0) -> Path:
    """An ImageFolder tree of ``IMAGES`` random RGB PNGs in two classes under ``folder / "data"``."""
    from PIL import Image
    data = folder / "data"
    rng = np.random.default_rng(seed)
    for index in range(IMAGES):
        target = data / f"class{index % 2}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(target / f"{index:02d}.png")
    return data


def _analysis(name: str, data: Path, resume_dir: Optional[Path]) -> Any:
    """Run analysis ``name`` on the proxy with random weights; returns its result object."""
    import torch
    from PIL import Image
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.analyzers.fgvis import FgvisSettings, fgvis
    from hpx_analysis.analyzers.truncation import truncation_sweep
    from hpx_analysis.datasets import labelled_images
    from hpx_analysis.images import eval_transform
    from hpx_analysis.models.zoo import load_model

    model = load_model("proxy_hpx_former", "random", seed=0)
    samples = labelled_images(data)
    if name == "erf":
        return effective_receptive_field(model, [s.path for s in samples], input_size=64, batch_size=1,
                                         resume_dir=resume_dir, progress=False)
    if name == "truncation":
        return truncation_sweep(model, samples, sizes=[0.0, 0.5, 1.0, 3.0], batch_size=1, resume_dir=resume_dir,
                                n_resamples=50, progress=False)
    transform, _ = eval_transform(model)
    images = torch.stack([transform(Image.open(s.path).convert("RGB")) for s in samples[:6]])
    return fgvis(model, images, settings=FgvisSettings(iterations=25, lambda_tries=2, lambda_start=1e-6), batch_size=1,
                 resume_dir=resume_dir, progress=False)


def _child(name: str, data: Path, resume_dir: Optional[Path], out: Path, log: Path, ready: Connection) -> None:
    """A child process: one analysis with a save after every batch, its result saved to ``out``, its stderr to
    ``log``. Exit code 0 when done, 130 on SIGINT (after the run layer saved its state)."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(descriptor, 2)
    import threading

    # Python's own handler even when the test runner ignores SIGINT (a shell's background job does), which
    # the fork server and its children would inherit: then no SIGINT would interrupt a run
    signal.signal(signal.SIGINT, signal.default_int_handler)

    import torch
    from tqdm.auto import tqdm
    from hpx_analysis import engine
    torch.set_num_threads(1)
    engine.SAVE_EVERY_S = 0.0
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a semaphore that a SIGKILL would leak
    try:
        ready.send("ready")
        _analysis(name, data, resume_dir).save(out)
    except KeyboardInterrupt:
        os._exit(130)


def same_result(name: str, result: Any, reference: Any) -> Optional[str]:
    """Why ``result`` differs from ``reference`` (None when equal: counts and records identical, maps to 1e-6)."""
    if name == "erf":
        if result.meta["models"][0]["images_used"] != reference.meta["models"][0]["images_used"]:
            return "image counts differ"
        if not np.allclose(result.arrays["maps"], reference.arrays["maps"], rtol=1e-6, atol=0):
            return "maps differ"
    elif name == "truncation":
        for key in ("top1_correct", "top5_correct"):
            if not np.array_equal(result.arrays[key], reference.arrays[key]):
                return f"{key} differs"
    else:
        if result.meta["records"] != reference.meta["records"]:
            return "records differ"
        if not np.allclose(result.arrays["masks"], reference.arrays["masks"], rtol=1e-6, atol=1e-6):
            return "masks differ"
    return None


def damage(kind: str, path: Path, rng: random.Random) -> None:
    """Damage a saved run state in place: ``kind`` one of ``DAMAGES``."""
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[:rng.randrange(1, len(data))])
    elif kind == "random-bytes":
        path.write_bytes(rng.randbytes(len(data)))
    else:  # a well-formed, finished state of another run: every array fits, the numbers and the key differ
        with np.load(path) as saved:
            arrays = dict(saved)
        other = {name: value + 1 for name, value in arrays.items() if not name.startswith("__") and name != "status"}
        with open(path, "wb") as handle:
            np.savez(handle, **{**arrays, **other, "status": np.ones_like(arrays["status"]),
                                "__key__": np.array("0" * 20)})


@dataclass
class Counts:
    """What the harness did and found."""

    interrupted: Dict[str, int] = field(default_factory=lambda: {"SIGINT": 0, "SIGKILL": 0})
    per_analysis: Dict[str, int] = field(default_factory=dict)
    finished_before_signal: int = 0
    damaged: Dict[str, int] = field(default_factory=dict)
    warned_after_damage: int = 0
    concurrent_pairs: int = 0
    waited_or_reused: int = 0
    results_compared: int = 0
    mismatches: List[str] = field(default_factory=list)

    @property
    def interruptions(self) -> int:
        return sum(self.interrupted.values())

    def table(self) -> str:
        rows = [("interruptions survived (SIGINT / SIGKILL)",
                 f"{self.interruptions} ({self.interrupted['SIGINT']} / {self.interrupted['SIGKILL']}; "
                 + ", ".join(f"{k} {v}" for k, v in self.per_analysis.items()) + ")"),
                ("damaged stores recovered", f"{sum(self.damaged.values())} ("
                 + ", ".join(f"{k} {v}" for k, v in sorted(self.damaged.items())) + f"; {self.warned_after_damage} "
                 "warned and moved aside)"),
                ("concurrent runs on one key", f"{self.concurrent_pairs} pairs ({self.waited_or_reused} second runs "
                 "waited and reused)"),
                ("final results compared with an uninterrupted run", f"{self.results_compared}, "
                 f"{len(self.mismatches)} differ")]
        return "\n".join(f"| {name} | {value} |" for name, value in rows)


class Harness:
    """Children from one fork server; ``folder`` holds inputs, stores, results and logs."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        self.folder, self.rng = folder, random.Random(seed)
        self.data = write_inputs(folder)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.counter = 0

    def start(self, name: str, resume_dir: Optional[Path]) -> Tuple[Any, Path, Path]:
        """A started child and its result stem and log, after it said it is ready (imports done)."""
        self.counter += 1
        out, log = self.folder / "results" / f"{name}-{self.counter}", self.folder / "logs" / f"{self.counter}.log"
        out.parent.mkdir(exist_ok=True)
        log.parent.mkdir(exist_ok=True)
        receiver, sender = self.context.Pipe(duplex=False)
        child = self.context.Process(target=_child, args=(name, self.data, resume_dir, out, log, sender))
        child.start()
        sender.close()
        if not receiver.poll(300):
            child.kill()
            raise RuntimeError(f"child for {name} never became ready; see {log}")
        receiver.close()
        return child, out, log

    def run(self, name: str, resume_dir: Optional[Path]) -> Tuple[Any, float, Path]:
        """One uninterrupted run: (result, seconds from ready to exit, log)."""
        from hpx_analysis.results import Result
        child, out, log = self.start(name, resume_dir)
        started = time.monotonic()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"{name} failed (exit {child.exitcode}); see {log}")
        return Result.load(out), time.monotonic() - started, log

    def interrupted_run(self, name: str, resume_dir: Path, duration: float, counts: Counts,
                        damage_after: bool, most: int = 2) -> Any:
        """Start, interrupt at a random instant within ``duration`` (SIGINT or SIGKILL), optionally damage the saved
        state, and resume, up to ``most`` interrupts, until a run finishes; returns the final result."""
        from hpx_analysis.results import Result
        for _ in range(most):
            child, out, log = self.start(name, resume_dir)
            child.join(self.rng.uniform(0.0, duration))
            if child.exitcode is not None:  # finished first: that run's result is final
                if child.exitcode != 0:
                    raise RuntimeError(f"{name} failed (exit {child.exitcode}); see {log}")
                counts.finished_before_signal += 1
                return Result.load(out)
            sent = self.rng.choice(["SIGINT", "SIGKILL"])
            os.kill(child.pid, getattr(signal, sent))
            child.join()
            if child.exitcode == 0:  # the signal came as it was exiting
                return Result.load(out)
            counts.interrupted[sent] += 1
            counts.per_analysis[name] = counts.per_analysis.get(name, 0) + 1
            states = sorted(resume_dir.glob("*/rank0-of-1.npz"))
            if damage_after and states:
                kind = DAMAGES[sum(counts.damaged.values()) % len(DAMAGES)]
                damage(kind, states[0], self.rng)
                counts.damaged[kind] = counts.damaged.get(kind, 0) + 1
                result, _, log = self.run(name, resume_dir)
                counts.warned_after_damage += "moved aside" in log.read_text()
                return result
        return self.run(name, resume_dir)[0]

    def concurrent_pair(self, name: str, resume_dir: Path) -> Tuple[Any, Any, str]:
        """Two processes on one run key at once: both results and their logs."""
        from hpx_analysis.results import Result
        first, out_first, log_first = self.start(name, resume_dir)
        second, out_second, log_second = self.start(name, resume_dir)
        first.join()
        second.join()
        if first.exitcode != 0 or second.exitcode != 0:
            raise RuntimeError(f"concurrent {name} runs failed ({first.exitcode}, {second.exitcode})")
        return Result.load(out_first), Result.load(out_second), log_first.read_text() + log_second.read_text()


def run_harness(folder: Path, interruptions: int = 24, damaged: int = 8, pairs_per_analysis: int = 1,
                seed: int = 0) -> Counts:
    """At least ``interruptions`` interruptions and ``damaged`` damaged stores, spread evenly over ``ANALYSES``,
    plus ``pairs_per_analysis`` concurrent pairs each; returns the counts (mismatches listed, if any)."""
    harness, counts = Harness(folder, seed), Counts()
    per_analysis = -(-interruptions // len(ANALYSES))
    damaged_per_analysis = -(-damaged // len(ANALYSES))
    for name in ANALYSES:
        reference, duration, _ = harness.run(name, None)
        trial = 0

        def check(result: Any, what: str) -> None:
            counts.results_compared += 1
            problem = same_result(name, result, reference)
            if problem:
                counts.mismatches.append(f"{name} {what}: {problem}")

        damaged_before = sum(counts.damaged.values())
        while (counts.per_analysis.get(name, 0) < per_analysis
               or sum(counts.damaged.values()) - damaged_before < damaged_per_analysis):
            trial += 1
            runs = folder / "runs" / f"{name}-{trial}"
            damage_after = sum(counts.damaged.values()) - damaged_before < damaged_per_analysis
            check(harness.interrupted_run(name, runs, duration, counts, damage_after), f"trial {trial}")
        for pair in range(pairs_per_analysis):
            first, second, log = harness.concurrent_pair(name, folder / "runs" / f"{name}-pair-{pair}")
            counts.concurrent_pairs += 1
            counts.waited_or_reused += "reusing the finished run" in log
            check(first, f"pair {pair} first")
            check(second, f"pair {pair} second")
    return counts


def main() -> None:
    import tempfile
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        counts = run_harness(Path(folder))
    print("| check | count |\n|---|---|")
    print(counts.table())
    print(f"\n{time.monotonic() - started:.0f} s; mismatches: {counts.mismatches or 'none'}")
    sys.exit(1 if counts.mismatches else 0)


if __name__ == "__main__":
    main()
