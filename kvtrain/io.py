"""Files and folders kvtrain writes: atomically (a reader never sees a half-written one, and a killed writer
leaves the old one in place), checked writable before the work, owned by one job at a time, and checked against
the sha256 recorded when they were written whenever they are read back."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kvtrain.errors import OutputInUseError, UserError


def process_umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def naming_a_full_disk(path: Path) -> Iterator[None]:
    """A full disk while writing `path` becomes a UserError naming it (the OSError of a write names no file)."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        raise UserError(f"{path}: no space left on the device while writing it ({free / 2**20:.0f} MiB free there): "
                        "free some space, or write to another folder") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling renamed into place, with the permissions `open()` would
    give a new file (0666 less the umask; a temporary file is private until then)."""
    path = Path(path)
    with naming_a_full_disk(path):
        _atomic_write_bytes(path, data)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
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


def permissions_as_created(paths: Iterable[Path]) -> None:
    """Give files and folders this job just wrote the permissions mkdir and open() give under the process's umask.

    Libraries that write through private temporary files of their own (safetensors, under `save_pretrained`) leave
    their outputs readable by their owner only, whatever the umask says.
    """
    mask = process_umask()
    for path in paths:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary sibling folder with ``write(folder)``, then move it to ``target``.

    ``target`` either keeps its previous content or gets the complete new content, never a mix: if
    ``write`` raises, the temporary folder is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with naming_a_full_disk(target):
            write(tmp)
        permissions_as_created([tmp, *tmp.rglob("*")])  # all new; mkdtemp made the folder private
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


def check_readable_file(path: str | Path, what: str) -> Path:
    """`path` as a Path when it is an existing file; otherwise a UserError saying whether it is missing or a folder
    (`what` names the flag or field it came from)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r}: is a folder; give a file")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r}: no such file")
    return path


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
    """One writer per output folder, held by every process of the job until it exits.

    ``FOLDER/.kvtrain.lock`` names the job (host, the launcher's pid under a multi-process launch or the process's
    own, the command); every process of the job holds a shared `flock` on it for as long as it works there. The
    kernel drops a process's flock when it dies, however it dies, so the folder is free exactly when no process of
    the job lives: ranks orphaned by a killed launcher keep it, a crashed job's leftover file does not. A new job
    needs the exclusive lock: it is refused naming the holder while any process holds it, and takes over (with a
    warning) a file nobody holds. `acquire` is idempotent per process; `release` removes the file when the last
    process of the job lets go.
    """

    def __init__(self, folder: str | Path, command: str):
        self.path = Path(folder) / LOCK_FILE
        self.command = command
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
        self.owner = {"host": socket.gethostname(), "pid": os.getppid() if launched else os.getpid()}
        self._fd: int | None = None

    def acquire(self) -> list[str]:
        """Take the lock; returns warnings to show (a leftover lock taken over)."""
        if self._fd is not None:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 10
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~process_umask())
            try:
                warnings = self._take(fd)
            except BlockingIOError:  # another rank of this job is writing the record: a moment
                os.close(fd)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            except BaseException:
                os.close(fd)
                raise
            if warnings is None:  # the path was replaced while we locked the old file: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            return warnings

    def _take(self, fd: int) -> list[str] | None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if holder is None:
                raise  # held while its record is being written
            if {k: holder.get(k) for k in self.owner} == self.owner:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another process of this job holds it
                return [] if self._current(fd) else None
            raise OutputInUseError(
                f"{self.path.parent}: in use by another job (pid {holder.get('pid')} on {holder.get('host')}, "
                f"started {holder.get('started')}: {holder.get('command')}); wait for it, or give another output "
                "folder"
            ) from None
        if not self._current(fd):
            return None
        holder = self._holder()
        warnings = []
        if holder is not None and {k: holder.get(k) for k in self.owner} != self.owner:
            if holder.get("host") not in (None, self.owner["host"]):
                fcntl.flock(fd, fcntl.LOCK_UN)
                raise OutputInUseError(f"{self.path.parent}: locked by a job on {holder.get('host')} ({holder}); this "
                                       f"host cannot tell whether it still runs: remove {self.path} if it does not")
            warnings.append(f"{self.path}: taking over the lock of a job that is no longer running ({holder})")
        record = {**self.owner, "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: the job's other processes share it
        return warnings

    def _current(self, fd: int) -> bool:
        """Whether `fd` is still the file at the lock's path (a releasing job may have removed it meanwhile)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Let go; the last process of the job removes the file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self._current(fd):
                self.path.unlink()
        except BlockingIOError:
            pass  # other processes of the job still hold it
        finally:
            os.close(fd)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # empty or unreadable: being written, or left by a writer killed mid-write


@contextmanager
def owned_folder(folder: str | Path, command: str) -> Iterator[list[str]]:
    """Within this block `folder` is this job's alone (`OutputLock`); yields the warnings of taking it over."""
    lock = OutputLock(folder, command)
    warnings = lock.acquire()
    try:
        yield warnings
    finally:
        lock.release()


def parse_error_line(err: Exception) -> str:
    """A YAML or JSON parse error in one line (PyYAML's own message spans several, with carets): what went wrong
    and where."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f"{getattr(err, 'problem', None) or err} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


# Integrity: every file kvtrain writes and later reads back carries a sha256 of its content, recorded when it is
# written and compared when it is read, so a flipped bit or a truncated copy is refused naming the file instead of
# being used. JSON files hold it under DIGEST_KEY; safetensors files in their metadata (kvtrain.artifacts.format);
# folders (training checkpoints) in a manifest of their files (`write_manifest`).
DIGEST_KEY = "kvtrain_sha256"
MANIFEST = "kvtrain_checksums.json"


class CorruptFileError(UserError):
    """A file whose content is not what was written (a flipped byte, a truncated or edited copy)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def write_checked_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write the mapping `data` atomically, with the sha256 of its content under DIGEST_KEY."""
    body = {k: v for k, v in data.items() if k != DIGEST_KEY}
    atomic_write_text(path, json.dumps({**body, DIGEST_KEY: sha256_bytes(_canonical_json(body))}, indent=2) + "\n")


def read_checked_json(path: str | Path, what: str) -> Any:
    """The JSON content of `path` (`what` names the kind of file in messages), its digest checked when it has one
    (files written by hand have none); raises CorruptFileError naming the file when the content is not what was
    written, UserError when it is not JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({parse_error_line(err)}): the {what} is damaged or "
                               "truncated") from None
    if isinstance(data, dict) and DIGEST_KEY in data:
        recorded = data.pop(DIGEST_KEY)
        if sha256_bytes(_canonical_json(data)) != recorded:
            raise CorruptFileError(f"{path}: its content does not match the sha256 recorded when it was written (the "
                                   f"{what} was damaged or edited since)")
    return data


def write_manifest(folder: str | Path, skip: Callable[[Path], bool] = lambda relative: False) -> None:
    """Record the size and sha256 of every file under `folder` (but the manifest itself, and those whose path
    relative to `folder` `skip` names) in `folder/MANIFEST`."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_of_file(p)}
             for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not skip(p.relative_to(folder))}
    write_checked_json(folder / MANIFEST, {"files": files})


def manifest_problem(folder: str | Path) -> str | None:
    """Why the files of `folder` are not those its manifest recorded (the first file named), or None when they are.
    A folder without a manifest (written by an older kvtrain) has nothing to compare: None."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None
    try:
        files = read_checked_json(folder / MANIFEST, "checksum manifest")["files"]
    except (UserError, KeyError, TypeError) as err:
        return f"{MANIFEST} is damaged ({err})"
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {recorded['bytes']} were written (truncated or replaced)"
        if sha256_of_file(path) != recorded["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written (damaged or modified)"
    return None
