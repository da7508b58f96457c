"""Exclusive lock on an output location, so two runs writing the same ``--out`` cannot interleave.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<out>.ptq-lock`` (beside the output, covering both ``<out>``
and ``<out>.ptq-partial``). A second run fails at once with `OutputLocked` (the CLI exits 2) instead of
waiting or writing. The kernel drops the lock when the holder dies (even by SIGKILL), so a stale lock file
never blocks a later run; the holder removes the file on release. Because the file can be removed between
another process's ``open`` and ``flock``, the holder checks after locking that the path still names the inode
it locked, and retries otherwise.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_SUFFIX = ".ptq-lock"


class OutputLocked(RuntimeError):
    """Another process holds the lock of this output."""


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


class OutputLock:
    """``with OutputLock(out): ...`` holds the exclusive lock of ``out`` for the block."""

    def __init__(self, out: Path):
        self.path = lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    holder = _read_pid(self.path)
                    who = f" (process {holder})" if holder else ""
                    raise OutputLocked(f"another ptq run{who} is writing {self.path.name[:-len(LOCK_SUFFIX)]} "
                                       f"(lock {self.path}); wait for it to finish or choose another --out") from e
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        raise OutputLocked(f"could not lock {self.path}: it keeps being replaced; is another ptq run busy there?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it retries on the inode check
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> str | None:
    try:
        txt = path.read_text()[:32].strip()
    except OSError:
        return None
    return txt if txt.isdigit() else None
