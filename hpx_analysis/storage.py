"""Files that survive interrupts, crashes and a second process: atomic replacement, advisory locks, damaged files
moved aside.

- :func:`atomic_output` writes to a temporary file with a unique name beside the target, flushes and fsyncs it,
  renames it onto the target with ``os.replace`` and fsyncs the folder: a reader sees the old file or the new
  one, never a mix, also after a power loss; an error or interrupt while writing removes the temporary file
  (a SIGKILL leaves it, :func:`remove_stale_temporaries` clears such leftovers).
- :class:`FileLock` holds an exclusive ``flock`` on a lock file: a second process waits (saying who holds it),
  and the kernel releases the lock when its holder dies, even by SIGKILL.
- :func:`move_aside` renames a damaged file to ``<name>.damaged-<time>`` so a fresh run can take its place.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from .errors import HpxError

TEMPORARY_SUFFIX = ".tmp"


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _file_mode() -> int:
    """The mode a newly created file gets under the current umask (``mkstemp`` alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[BinaryIO]:
    """``with atomic_output(path) as handle:`` write binary data to ``handle``; on leaving the block it becomes
    ``path`` atomically and durably (module docstring). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        os.fchmod(descriptor, _file_mode())
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """``data`` as the content of ``path``, replaced atomically (:func:`atomic_output`); returns the path."""
    with atomic_output(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """``text`` (UTF-8) as the content of ``path``, replaced atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files that an interrupted :func:`atomic_output` of ``path`` left (call it only while
    holding the lock that serialises writers of ``path``)."""
    for leftover in path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def move_aside(path: Path, reason: str) -> Path:
    """Rename ``path`` to ``<name>.damaged-<UTC time>-<pid>`` and say so on stderr in one line; returns the new
    path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")
    os.replace(path, aside)
    print(f"warning: {path} cannot be used ({reason}); moved aside to {aside.name}, starting afresh",
          file=sys.stderr, flush=True)
    return aside


class FileLock:
    """An exclusive advisory lock on ``path`` (created if missing), held between :meth:`acquire` and
    :meth:`release` or inside ``with``. The holder writes its pid and host into the file, so a waiting process
    can say who holds it."""

    def __init__(self, path: Path | str, what: str = "") -> None:
        self.path, self.what = Path(path), what or str(path)
        self._handle: Optional[BinaryIO] = None

    def acquire(self, timeout_s: Optional[float] = None, poll_s: float = 0.1) -> None:
        """Take the lock, waiting while another process holds it (announced once on stderr); HpxError after
        ``timeout_s`` seconds (None: wait as long as it takes)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")
        started, announced = time.monotonic(), False
        try:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = self.path.read_text(errors="replace").strip() or "another process"
                    if timeout_s is not None and time.monotonic() - started >= timeout_s:
                        raise HpxError(f"{self.what} is in use by {holder}; try again when it has finished") from None
                    if not announced:
                        print(f"{self.what} is in use by {holder}; waiting for it to finish", file=sys.stderr,
                              flush=True)
                        announced = True
                    time.sleep(poll_s)
            handle.truncate(0)
            handle.write(f"process {os.getpid()} on {socket.gethostname()}".encode())
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self._handle = handle

    def release(self) -> None:
        """Give the lock up (closing the file releases the flock)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["atomic_output", "write_bytes_atomic", "write_text_atomic", "remove_stale_temporaries", "move_aside",
           "FileLock"]
