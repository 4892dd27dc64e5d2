"""Reruns never serve a stale, partial or double-counted result (issue 20): each reproduction of the audit as its
own test, plus the store's writes, locks and recovery from damaged files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import hpx_analysis
from hpx_analysis import engine, provenance
from hpx_analysis.engine import DigestCache, ImageDataset, RunStore, run_batches, run_key, tensor_digest
from hpx_analysis.errors import HpxError
from hpx_analysis.results import Result
from hpx_analysis.storage import FileLock, atomic_output

from .test_engine import OUTPUTS, _step


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)


@pytest.fixture
def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _ppm(path: Path, value: int) -> None:
    """A 4 x 4 PPM (uncompressed: every such file has the same size) of one grey ``value``."""
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


# -- 1. image content is in the key ----------------------------------------------------------------------------

def test_an_overwritten_image_is_recomputed(model, tmp_path: Path, capsys) -> None:
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(image)
    first = run_batches(model, ImageDataset([image], _to_tensor), _step([]), OUTPUTS, batch_size=1,
                        resume_dir=tmp_path / "runs", progress=False)
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(image)  # another picture under the same name
    calls: List[List[int]] = []
    second = run_batches(model, ImageDataset([image], _to_tensor), _step(calls), OUTPUTS, batch_size=1,
                         resume_dir=tmp_path / "runs", progress=False)
    assert calls == [[0]] and second.counts["batches_resumed"] == 0 and second.key != first.key
    np.testing.assert_allclose(second.arrays["double"], [[400 / 255] * 3], rtol=1e-6)
    assert "reusing" not in capsys.readouterr().err


def test_a_rewrite_of_equal_size_and_restored_mtime_is_hashed_again(tmp_path: Path, monkeypatch) -> None:
    """The digest cache is keyed on ctime and inode too: a same-size rewrite whose mtime is set back is seen."""
    monkeypatch.setattr(DigestCache, "RACY_S", 0.0)  # the files here are seconds old: remember them at once
    image = tmp_path / "a.ppm"
    _ppm(image, 10)
    stat = os.stat(image)
    cache = DigestCache(tmp_path / "digests.sqlite")
    before = cache.file(image)
    cache.commit()
    remembered = DigestCache(tmp_path / "digests.sqlite")
    assert remembered.file(image) == before and remembered.hashed == 0
    _ppm(image, 200)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(image).st_size == stat.st_size and os.stat(image).st_mtime_ns == stat.st_mtime_ns
    again = DigestCache(tmp_path / "digests.sqlite")
    assert again.file(image) != before and again.hashed == 1


def test_digests_of_unchanged_files_are_remembered(tmp_path: Path, monkeypatch) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.ppm")
        _ppm(paths[-1], 50 * i)
    monkeypatch.setattr(DigestCache, "RACY_S", 0.0)
    first = DigestCache(tmp_path / "d.sqlite")
    digests = [first.file(p) for p in paths]
    first.commit()
    second = DigestCache(tmp_path / "d.sqlite")
    assert [second.file(p) for p in paths] == digests and (first.hashed, second.hashed) == (3, 0)
    monkeypatch.undo()
    fresh = tmp_path / "fresh.ppm"  # just written: within the racy window, so hashed every time
    _ppm(fresh, 7)
    for _ in range(2):
        cache = DigestCache(tmp_path / "d.sqlite")
        cache.file(fresh)
        cache.commit()
        assert cache.hashed == 1


# -- 2. kernel modifications are in the key --------------------------------------------------------------------

def test_an_erf_inside_a_kernel_modification_is_not_the_cached_unmodified_one(tmp_path: Path) -> None:
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.interventions import modify_kernels, truncate_kernels
    from hpx_analysis.models.zoo import load_model

    torch.set_num_threads(1)
    net = load_model("proxy_hpx_former", "random", seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    runs = tmp_path / "runs"
    plain = effective_receptive_field(net, images, resume_dir=runs, progress=False)
    with modify_kernels(net, lambda k, info: torch.zeros_like(k)):
        fresh = effective_receptive_field(net, images, progress=False)
        cached = effective_receptive_field(net, images, resume_dir=runs, progress=False)
    with truncate_kernels(net, [0], size=0.3, input_size=64):
        cut_fresh = effective_receptive_field(net, images, progress=False)
        cut_cached = effective_receptive_field(net, images, resume_dir=runs, progress=False)
    assert not np.allclose(fresh.arrays["maps"], plain.arrays["maps"])
    np.testing.assert_array_equal(cached.arrays["maps"], fresh.arrays["maps"])
    np.testing.assert_array_equal(cut_cached.arrays["maps"], cut_fresh.arrays["maps"])
    assert cached.meta["options"]["batches_resumed"] == cut_cached.meta["options"]["batches_resumed"] == 0
    assert len({plain.meta["models"][0]["run_key"], cached.meta["models"][0]["run_key"],
                cut_cached.meta["models"][0]["run_key"]}) == 3
    again = effective_receptive_field(net, images, resume_dir=runs, progress=False)  # modification left: reused
    assert again.meta["options"]["batches_resumed"] == 2  # one image per batch
    np.testing.assert_array_equal(again.arrays["maps"], plain.arrays["maps"])


def test_an_override_is_in_the_key_and_equal_kernels_share_it(model) -> None:
    from hpx_analysis.inspection import long_filter_layers
    from hpx_analysis.interventions import modify_kernels
    from hpx_analysis.models.zoo import load_model

    net = load_model("proxy_hpx_former", "random", seed=0)
    digest = "inputs"
    plain = run_key(net, digest, {})
    filt = long_filter_layers(net)[0].long_filter
    with filt.override_kernel(filt.kernel().detach() * 2):
        overridden = run_key(net, digest, {})
    with modify_kernels(net, lambda k, info: k * 2):
        doubled = run_key(net, digest, {})
    with modify_kernels(net, lambda k, info: k * 3):
        tripled = run_key(net, digest, {})
    assert len({plain, overridden, tripled}) == 3 and doubled == overridden
    assert run_key(net, digest, {}) == plain


# -- 3. code and environment are in the key ---------------------------------------------------------------------

def test_a_code_change_or_another_library_version_gives_another_key(model, monkeypatch) -> None:
    key = run_key(model, "inputs", {})
    monkeypatch.setattr(engine, "checked_code_fingerprint", lambda: "0" * 64)
    assert run_key(model, "inputs", {}) != key
    monkeypatch.undo()
    assert run_key(model, "inputs", {}) == key
    real = engine.library_versions
    monkeypatch.setattr(engine, "library_versions", lambda names: {**real(names), "torch": "0.0.1"})
    assert run_key(model, "inputs", {}) != key
    monkeypatch.undo()
    assert run_key(model.double(), "inputs", {}) != key  # the dtype


def test_a_model_config_file_is_keyed_on_its_content(tmp_path: Path) -> None:
    """An edit of a config file that keeps every weight's shape (attention heads) still changes the computation:
    the key follows the file's content, not its name."""
    from hpx_analysis.models.zoo import load_model

    config = json.loads((Path(__file__).parent / "data" / "golden" / "tiny" / "tiny_hpx_a.json").read_text())
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config))
    before = load_model(str(path), "random", seed=0)
    for spec in config["token_mixers"]:
        if spec["type"] == "attention":
            spec["head_dim"] = 4
    path.write_text(json.dumps(config))
    after = load_model(str(path), "random", seed=0)
    assert engine.weights_digest(before) == engine.weights_digest(after)
    assert not torch.equal(before(torch.ones(1, 3, 64, 64)), after(torch.ones(1, 3, 64, 64)))
    assert run_key(before, "inputs", {}) != run_key(after, "inputs", {})
    assert after.hpx_provenance["config"] == config


def test_transforms_are_keyed_on_what_they_compute(model) -> None:
    """torchvision's and timm's transforms by their exact state (a Normalize mean that its repr rounds away still
    counts); a Lambda or function by its identity in this process, never by how it prints; inf and -inf differ."""
    from torchvision import transforms as T

    images = [np.zeros((4, 4, 3), np.uint8)]

    def digest(transform) -> str:
        return ImageDataset(images, transform).content_digest()

    def normalise(mean: float) -> T.Compose:
        return T.Compose([T.ToTensor(), T.Normalize(mean=torch.tensor([mean] * 3), std=torch.tensor([0.2] * 3))])
    assert repr(normalise(0.48500)) == repr(normalise(0.48504))
    assert digest(normalise(0.48500)) == digest(normalise(0.48500)) != digest(normalise(0.48504))
    keep, zero = T.Lambda(lambda x: x * 1), T.Lambda(lambda x: x * 0)
    assert repr(keep) == repr(zero) and digest(keep) != digest(zero) and digest(keep) == digest(keep)
    assert engine.describe_transform(keep) != engine.describe_transform(T.Lambda(keep.lambd))
    assert run_key(model, "inputs", {"lambda": float("inf")}) != run_key(model, "inputs", {"lambda": float("-inf")})


def test_numerics_switches_are_in_the_key(model, monkeypatch) -> None:
    """"high" or "medium" let float32 matmuls round through TF32 / bf16, timm's fused attention rounds its own way:
    another number, another key."""
    monkeypatch.delenv("TIMM_FUSED_ATTN", raising=False)
    key = run_key(model, "inputs", {})
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert run_key(model, "inputs", {}) != key
    finally:
        torch.set_float32_matmul_precision(previous)
    assert run_key(model, "inputs", {}) == key
    monkeypatch.setenv("TIMM_FUSED_ATTN", "0")
    assert run_key(model, "inputs", {}) != key


def test_the_code_fingerprint_covers_every_source_file(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    before = provenance.source_fingerprint(tmp_path / "pkg")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    edited = provenance.source_fingerprint(tmp_path / "pkg")
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "sub" / "c.py")
    renamed = provenance.source_fingerprint(tmp_path / "pkg")
    (tmp_path / "pkg" / "kernels.c").write_text("int x;\n")  # native kernels' C source counts too
    with_c = provenance.source_fingerprint(tmp_path / "pkg")
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    assert len({before, edited, renamed, with_c}) == 4 and provenance.source_fingerprint(tmp_path / "pkg") == with_c
    assert provenance.code_fingerprint() == provenance.source_fingerprint(Path(hpx_analysis.__file__).parent)


def test_run_keys_refuse_code_changed_after_import(tmp_path: Path, monkeypatch) -> None:
    """The fingerprint is the source as loaded; once the files change (an update, an edit before a reload) a run key
    is refused instead of filing old code's numbers under the new code's key. A touch without a change passes, and
    an editor's lock link (a dangling ``.#name.py``) is no source file."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    (package / ".#a.py").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(provenance._LoadedSource, "root", package)
    monkeypatch.setattr(provenance._LoadedSource, "stats", None)
    loaded = provenance.code_fingerprint()
    assert loaded == provenance.source_fingerprint(package) == provenance.checked_code_fingerprint()
    os.utime(package / "a.py", ns=(1, 1))  # touched, same bytes
    assert provenance.checked_code_fingerprint() == loaded
    (package / "a.py").write_text("x = 2\n")
    with pytest.raises(HpxError, match=r"changed since this process loaded it \(a.py\); restart Python"):
        provenance.checked_code_fingerprint()
    assert provenance.code_fingerprint() == loaded  # what results record: the code that runs


def test_the_version_comes_from_the_package_metadata() -> None:
    import importlib.metadata
    assert hpx_analysis.__version__ == importlib.metadata.version("hpx-analysis") == provenance.package_version()
    source = Path(engine.__file__).read_text()
    assert "__version__" not in source and "from . import" not in source


# -- 4. an interrupt never counts a batch twice -----------------------------------------------------------------

class _Exploding:
    """An output whose conversion raises KeyboardInterrupt once: an interrupt between two outputs of a batch."""

    def __init__(self, value: np.int64, fired: List[bool]) -> None:
        self.value, self.fired = value, fired

    def __array__(self, dtype=None, copy=None):
        if not self.fired:
            self.fired.append(True)
            raise KeyboardInterrupt
        return np.asarray(self.value, dtype=dtype)


def test_an_interrupt_between_a_batchs_outputs_is_not_counted_twice(model, tmp_path: Path) -> None:
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    reference = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, progress=False)
    fired: List[bool] = []
    plain = _step([])

    def step(batch) -> Dict[str, object]:
        produced = plain(batch)
        if batch.indices.tolist()[0] == 2:  # the second batch: "total" is added, then Ctrl-C before "count"
            produced["count"] = _Exploding(produced["count"], fired)
        return produced

    with pytest.raises(KeyboardInterrupt):
        run_batches(model, ImageDataset(images), step, OUTPUTS, batch_size=2, resume_dir=tmp_path, progress=False)
    resumed = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                          progress=False)
    assert resumed.counts["batches_resumed"] == 1 and int(resumed.arrays["count"]) == 5
    for name in OUTPUTS:
        np.testing.assert_array_equal(resumed.arrays[name], reference.arrays[name])


# -- 5. a damaged store restarts --------------------------------------------------------------------------------

def _damage(kind: str, path: Path, other: Path) -> None:
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "flipped":  # one byte inside the zip's first member: its checksum no longer matches
        middle = bytearray(data)
        middle[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(middle))
    elif kind == "other-key":
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "flipped", "other-key"])
def test_a_damaged_store_is_moved_aside_and_the_run_starts_afresh(model, tmp_path: Path, capsys, kind) -> None:
    images = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    reference = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, progress=False)
    done = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                       progress=False)
    other = run_batches(model, ImageDataset(images + 1), _step([]), OUTPUTS, batch_size=2,
                        resume_dir=tmp_path, progress=False)
    store = RunStore(tmp_path).path(done.key, 0, 1)
    _damage(kind, store, RunStore(tmp_path).path(other.key, 0, 1))
    capsys.readouterr()
    calls: List[List[int]] = []
    again = run_batches(model, ImageDataset(images), _step(calls), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                        progress=False)
    assert calls == [[0, 1], [2, 3]] and again.counts["batches_resumed"] == 0
    for name in OUTPUTS:
        np.testing.assert_array_equal(again.arrays[name], reference.arrays[name])
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "moved aside" in warning[0]
    assert len(list(store.parent.glob("*.damaged-*"))) == 1


def test_a_state_of_another_layout_is_moved_aside(model, tmp_path: Path, capsys) -> None:
    images = torch.rand(2, 3, 4, 4)
    done = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                       progress=False)
    path = RunStore(tmp_path).path(done.key, 0, 1)
    with np.load(path) as saved:
        arrays = dict(saved)
    np.savez(path, **{**arrays, "__format__": np.array(1)})
    np.savez(path.with_name("x.npz"), **{**arrays, "total": np.zeros(4)})
    again = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                        progress=False)
    assert again.counts["batches_resumed"] == 0 and "another version" in capsys.readouterr().err
    path.write_bytes(path.with_name("x.npz").read_bytes())  # right key, wrong shape
    np.savez(path, **{**arrays, "total": np.zeros(4)})
    again = run_batches(model, ImageDataset(images), _step([]), OUTPUTS, batch_size=2, resume_dir=tmp_path,
                        progress=False)
    assert again.counts["batches_resumed"] == 0 and "'total'" in capsys.readouterr().err


# -- 6. writes: atomic, durable, unique, locked ------------------------------------------------------------------

def test_writes_use_unique_temporaries_fsync_and_leave_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    synced: List[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "state.npz"
    with atomic_output(target) as first, atomic_output(target) as second:  # two writers of one file at once
        assert first.name != second.name
        first.write(b"first")
        second.write(b"second")
    assert target.read_bytes() == b"first" and len(synced) == 4  # file and folder, twice
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["state.npz"]


def test_a_second_process_on_the_same_run_waits_and_is_told_who_holds_it(tmp_path: Path) -> None:
    lock_path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from hpx_analysis.storage import FileLock
        lock = FileLock({str(lock_path)!r})
        lock.acquire()
        print("held", flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HpxError, match=f"in use by process {holder.pid} on"):
            FileLock(lock_path, "run X").acquire(timeout_s=0.3)
    finally:
        holder.kill()  # the kernel drops a dead holder's lock, even after SIGKILL
        holder.wait()
    lock = FileLock(lock_path)
    lock.acquire(timeout_s=5)
    lock.release()


def test_a_result_pair_is_written_npz_first_and_checked_on_load(tmp_path: Path, monkeypatch) -> None:
    from hpx_analysis import results
    Result(arrays={"x": np.arange(3)}, meta={"n": 1}).save(tmp_path / "r")
    meta = json.loads((tmp_path / "r.json").read_text())
    assert meta["arrays_file"]["name"] == "r.npz" and len(meta["arrays_file"]["sha256"]) == 64
    assert "hpx-analysis code" in meta["versions"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "write_text_atomic", crash)  # interrupted after the arrays, before the metadata
    with pytest.raises(KeyboardInterrupt):
        Result(arrays={"x": np.arange(5)}, meta={"n": 2}).save(tmp_path / "r")
    with pytest.raises(HpxError, match="r.npz does not belong to r.json"):
        Result.load(tmp_path / "r")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- images of every kind ------------------------------------------------------------------------------------------

def test_paths_text_pil_images_and_arrays_are_images(tmp_path: Path) -> None:
    from hpx_analysis.analyzers.erf import effective_receptive_field
    from hpx_analysis.images import ImageSource
    from hpx_analysis.models.zoo import load_model

    pixels = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    net = load_model("proxy_convformer", "random", seed=0)
    maps = [effective_receptive_field(net, [image], input_size=32, progress=False).arrays["maps"]
            for image in (ImageSource(name="photo.png", path=path), path, str(path), Image.open(path), pixels,
                          pixels.astype(np.float32) / 255)]
    for other in maps[1:]:
        np.testing.assert_allclose(other, maps[0], rtol=1e-6)
    with pytest.raises(HpxError, match=r"image\[0\]: cannot read a dict"):
        effective_receptive_field(net, [{"not": "an image"}], input_size=32, progress=False)


def test_tensor_digests_see_dtype_and_shape() -> None:
    values = torch.arange(6, dtype=torch.float32)
    assert len({tensor_digest(values), tensor_digest(values.reshape(2, 3)), tensor_digest(values.double())}) == 3


# -- 7. every command says when it reuses or resumes ---------------------------------------------------------------

def test_erf_and_truncate_say_when_they_reuse_a_finished_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner
    from hpx_analysis_cli.app import app
    from .conftest import random_image_folder

    data = random_image_folder(tmp_path / "data", ("a", "b"), per_class=2, size=(40, 40))
    commands = {"erf": ["erf", "--model", "proxy_hpx_former", "--weights", "random", "--images", str(data),
                        "--num-images", "2", "--input-size", "64", "--out", str(tmp_path / "out")],
                "truncate": ["truncate", "--model", "proxy_hpx_former", "--weights", "random", "--data", str(data),
                             "--sizes", "0,1", "--bootstrap", "20", "--out", str(tmp_path / "out")]}
    for name, args in commands.items():
        first = CliRunner().invoke(app, args)
        assert first.exit_code == 0, first.output
        assert "reusing" not in first.output
        second = CliRunner().invoke(app, args)
        assert second.exit_code == 0 and "reusing the finished run" in second.output, (name, second.output)
        assert "--no-resume" in second.output
        fresh = CliRunner().invoke(app, args + ["--no-resume"])
        assert fresh.exit_code == 0 and "reusing" not in fresh.output


# -- 8. demo caches follow the proxy's configuration, the task generator and the code --------------------------------

def test_demo_cache_keys_follow_architecture_init_task_and_code(monkeypatch, tmp_path: Path) -> None:
    from hpx_analysis.demo import pipeline, tasks, training
    from hpx_analysis.models import proxies

    config = training.TrainingConfig("proxy_hpx_former", "same-row", 10)
    key = config.key()
    spec = dict(proxies.PROXY_SPECS["proxy_hpx_former"][0])
    monkeypatch.setitem(proxies.PROXY_SPECS, "proxy_hpx_former", [{**spec, "filter_sin_init": 1.0}])  # init option
    assert config.key() != key
    monkeypatch.undo()
    monkeypatch.setitem(proxies.PROXY_DIMS, "proxy_hpx_former", (48,))  # architecture
    assert config.key() != key
    monkeypatch.undo()
    monkeypatch.setattr(tasks, "MIN_GAP", 36)  # the task generator
    assert config.key() != key
    folder = pipeline.write_task_folder("same-row", 4, 0, tmp_path)
    monkeypatch.undo()
    assert pipeline.write_task_folder("same-row", 4, 0, tmp_path) != folder
    monkeypatch.setattr(training, "content_key", lambda description, length: "code-changed")  # the code, via the key
    assert config.key() != key
    monkeypatch.undo()
    assert config.key() == key and training.TrainingConfig("proxy_hyena_nd", "same-row", 10).key() != key


def test_a_cached_proxy_whose_record_does_not_name_its_checkpoint_is_retrained(monkeypatch, tmp_path: Path) -> None:
    from hpx_analysis.demo import training

    config = training.TrainingConfig("proxy_convformer", "stripes", 2, batch_size=4, eval_images=8)
    _, record, checkpoint = training.load_or_train(config, tmp_path, progress=False)
    assert len(record["checkpoint_sha256"]) == 64
    checkpoint.write_bytes(checkpoint.read_bytes()[:-8] + b"\0" * 8)  # a checkpoint from another write
    trained: List[bool] = []
    real = training.train_proxy
    monkeypatch.setattr(training, "train_proxy", lambda *a, **k: (trained.append(True), real(*a, **k))[1])
    _, again, _ = training.load_or_train(config, tmp_path, progress=False)
    assert trained == [True] and again["checkpoint_sha256"] == record["checkpoint_sha256"]
    assert len(list(tmp_path.glob("*.damaged-*"))) == 2


def test_a_user_defined_explanation_step_is_keyed_by_its_code() -> None:
    from hpx_analysis.analyzers.methods import StepExplainer

    def step(batch):
        return {"maps": batch.images.abs().mean(1)}

    def edited(batch):
        return {"maps": batch.images.abs().amax(1)}

    scale = 2.0

    def closing(batch):
        return {"maps": batch.images.abs().mean(1) * scale}

    keys = [StepExplainer("mine", f).keyed() for f in (step, edited, closing)]
    assert keys[0] == StepExplainer("mine", step).keyed() and len({k["step"] for k in keys}) == 3
    scale = 3.0  # noqa: F841  (a value the step closes over changes its key too)
    assert StepExplainer("mine", closing).keyed() != keys[2]
