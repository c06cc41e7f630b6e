"""Files and folders kvtrain writes: atomically (a reader never sees a half-written one, and a killed writer
leaves the old one in place), checked writable before the work, and owned by one job at a time."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from kvtrain.errors import OutputInUseError, UserError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary sibling folder with ``write(folder)``, then move it to ``target``.

    ``target`` either keeps its previous content or gets the complete new content, never a mix: if
    ``write`` raises, the temporary folder is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other folder
        write(tmp)
        # os.replace cannot overwrite a non-empty folder: move the old one aside (a rename, so readers
        # never see it half deleted), then delete it.
        old = tmp.with_name(tmp.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path, what: str, *, folder: bool) -> None:
    """Fail now, not after the work, when `path` (a file, or a `folder`) could not be written: a file in the way,
    a folder where a file goes, no permission. `what` names the flag or field the path came from."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{what} {str(path)!r}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{what} {str(path)!r}: is a folder; give a file path")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {str(path)!r}: {str(existing)!r} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r}: {str(existing)!r} is not writable")


LOCK_FILE = ".kvtrain.lock"


class OutputLock:
    """One writer per output folder: `acquire` creates ``FOLDER/.kvtrain.lock`` naming this job, or fails at once
    naming the job that holds it.

    A job is the process, or under a multi-process launch the launcher that started its ranks (the parent of
    every rank), so all ranks of one job share the lock. A lock whose job is no longer running on this host
    (killed, crashed) is stale and taken over with a warning; one from another host is never presumed stale.
    """

    def __init__(self, folder: str | Path, command: str):
        self.path = Path(folder) / LOCK_FILE
        self.command = command
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
        self.owner = {"host": socket.gethostname(), "pid": os.getppid() if launched else os.getpid()}

    def acquire(self) -> list[str]:
        """Take the lock; returns warnings to show (a stale lock taken over)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({**self.owner, "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and {k: holder.get(k) for k in self.owner} == self.owner:
                return []  # another rank of this job took it
            if holder is not None and self._alive(holder):
                raise OutputInUseError(
                    f"{self.path.parent}: in use by another job (pid {holder['pid']} on {holder['host']}, started "
                    f"{holder.get('started')}: {holder.get('command')}); wait for it, or give another output folder"
                ) from None
            atomic_write_text(self.path, record)
            return [f"{self.path}: taking over the lock of a job that is no longer running ({holder})"]
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return []

    def release(self) -> None:
        if self._holder() is not None and {k: self._holder().get(k) for k in self.owner} == self.owner:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: a writer killed mid-write, stale by construction

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") != self.owner["host"]:
            return True  # cannot tell from here
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True
