"""Crash-consistent writes: a file or a whole output directory is replaced as a unit, or not at all.

Files: `write_text_atomic` / `write_bytes_atomic` write a temporary sibling, fsync it, rename it over the target and
fsync the folder. A reader sees the old file or the new one, never half of one.

Directories (`replace_dir`): a multi-file output (a merged model, an evaluation's samples and summary, a training
run's final model) is built in full in a hidden sibling and swapped in. With FINAL = `parent/name`:

    lock     parent/.name.gpo-lock          flocked while held; holds host, pid and the pid's start time
    build    parent/.name.gpo-new-<pid>     everything is written here, plus the marker `.gpo-trl`; fsynced
    swap 1   FINAL -> parent/.name.gpo-old-<pid>      (only when FINAL exists)
    swap 2   parent/.name.gpo-new-<pid> -> FINAL
    clean    remove .name.gpo-old-<pid>, then the lock

A SIGKILL at any moment leaves FINAL either the previous complete output or the new complete output, except between
the two swaps, where FINAL is missing (never a mix). The next writer (or `recover`) repairs that under the lock: when
FINAL is missing and a `.gpo-old-*` exists, the backup is renamed back to FINAL (the previous complete output;
the new one is rebuilt by the rerun); every other `.gpo-new-*` / `.gpo-old-*` is an unfinished build or a finished
swap's leftover and is removed. A lock whose process is gone (its flock died with it; the pid it names is dead or
reused) is taken over, so the same command simply runs again, and racing writers never both hold it. A lock
from another host is never guessed at: the error names the file to delete.

Ownership (`check_output_dir`): every directory gpo-trl builds holds `.gpo-trl`, a JSON marker with the command and
the files it wrote. gpo-trl replaces a directory only when it holds no file it did not write there; anything else
(a folder it did not create, or a file added to one of its folders) is refused, naming the files, unless the user
passes the command's overwrite flag.

Tests kill the protocol at each step: `fault_point(label)` is called before every file operation; with
`GPO_TRL_FAULT_AT=N` in the environment the Nth call exits the process at once (`os._exit(137)`, no cleanup, as
SIGKILL), and `inject_fault(N)` makes it raise `SimulatedCrash` (a BaseException, so cleanup code that catches
Exception does not run either).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputExistsError

MARKER = ".gpo-trl"

# --- Fault injection (tests) --------------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """Raised by `fault_point` under `inject_fault`: a crash at that point, with no cleanup run."""


_faults = {"at": None, "count": 0, "labels": None}


def fault_point(label: str):
    """Called before each file operation of a protocol; a test can stop the process here (see module docstring)."""
    _faults["count"] += 1
    if _faults["labels"] is not None:
        _faults["labels"].append(label)
    env = os.environ.get("GPO_TRL_FAULT_AT")
    if env and _faults["count"] == int(env):
        os._exit(137)
    if _faults["at"] is not None and _faults["count"] == _faults["at"]:
        raise SimulatedCrash(f"simulated crash at operation {_faults['count']} ({label})")


@contextmanager
def inject_fault(at: int | None = None) -> Iterator[list[str]]:
    """Count the file operations in the block (the labels are yielded as a list), crashing at the `at`-th."""
    labels: list[str] = []
    _faults.update(at=at, count=0, labels=labels)
    try:
        yield labels
    finally:
        _faults.update(at=None, count=0, labels=None)


# --- Files --------------------------------------------------------------------------------------------------------


def fsync_path(path: Path):
    """Flush a file's or a folder's entries to disk (a folder's fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes):
    """Write to a temporary sibling, fsync, rename over `path`: a crash never leaves a half file that a later run
    would trust. The temporary name carries the pid, so two writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove_dead_writers_files(path)
    fault_point(f"write {path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"rename {path.name}")
    os.replace(tmp, path)
    fsync_path(path.parent)


def _remove_dead_writers_files(path: Path):
    """Temporary files of `path` left by killed processes (`.NAME.tmp-<pid>`, that pid no longer running here)."""
    prefix = f".{path.name}.tmp-"
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and _process_identity(int(pid)) is None:
            leftover.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str):
    write_bytes_atomic(path, text.encode())


# --- Ownership ----------------------------------------------------------------------------------------------------


def read_marker(directory: Path) -> dict | None:
    """The `.gpo-trl` marker of a folder gpo-trl built, or None."""
    path = Path(directory) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def foreign_entries(directory: Path, strict: bool = True) -> list[str]:
    """The entries of `directory` gpo-trl did not write there. Without a marker: everything. With one: nothing, or
    with `strict` the entries the marker does not list (files a user added to a gpo-trl output)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    marker = read_marker(directory)
    if marker is None:
        return names
    if not strict:
        return []
    written = set(marker.get("files", []))
    return [name for name in names if name not in written]


def check_output_dir(directory: Path, overwrite: bool = False, flag: str = "--overwrite", strict: bool = True,
                     what: str = "output directory"):
    """Refuse (OutputExistsError) to write where files of the user's would be replaced, or where a file stands."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"The {what} {directory} is a file, not a folder: choose another path.")
    if overwrite:
        return
    foreign = foreign_entries(directory, strict=strict)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"The {what} {directory} holds files gpo-trl did not write there ({shown}); they "
                                f"would be replaced. Choose a new or empty folder, or pass `{flag}` to replace them.")


# --- The lock -----------------------------------------------------------------------------------------------------


def _sibling(final: Path, kind: str, token: str = "") -> Path:
    return final.with_name(f".{final.name}.gpo-{kind}{'-' + token if token else ''}")


def _process_identity(pid: int) -> float | None:
    """The process's start time, or None when no such process runs here."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _lock_is_stale(content: dict) -> bool:
    if content.get("host") != socket.gethostname():
        return False  # cannot tell from here
    if content.get("pid") == os.getpid():
        return True  # flocked by us, so no live block of ours holds it: one that crashed (tests' SimulatedCrash)
    started = _process_identity(int(content.get("pid", -1)))
    return started is None or abs(started - float(content.get("started", 0))) > 1e-3


@contextmanager
def directory_lock(final: Path) -> Iterator[None]:
    """One writer per output at a time; a lock left by a killed process is taken over.

    The kernel arbitrates: the holder keeps an exclusive `flock` on the lock file, which dies with its process, so
    racing writers can neither both take a free lock nor both take over a dead one. The file's content (host, pid,
    start time) names the holder in the error, and a live process it names still holds the output (a lock written
    by another host, or by a version without flock, is not taken)."""
    lock = _sibling(final, "lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_identity(os.getpid())}
    fd = _flock_lock_file(lock, final)
    holder = _read_holder(fd)
    if holder and not _lock_is_stale(holder):
        os.close(fd)
        raise _held_by(final, lock, holder)
    os.ftruncate(fd, 0)  # ours now: a fresh lock, or a dead writer's taken over
    os.pwrite(fd, json.dumps(me).encode(), 0)
    try:
        yield
        fault_point("unlock")
    except SimulatedCrash:
        os.close(fd)  # a crash leaves its lock file behind, as a killed process does
        raise
    except BaseException:
        _release(lock, fd)
        raise
    else:
        _release(lock, fd)


def _flock_lock_file(lock: Path, final: Path) -> int:
    """An open descriptor of the lock file, exclusively flocked, whose path still names it (a holder unlinks the file
    when it releases, and a racer may have opened the old file just before)."""
    import fcntl

    for _ in range(100):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _held_by(final, lock, holder) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # released and unlinked under us: open the new one
    raise OutputExistsError(f"Could not take the lock {lock} for {final}; delete it if no gpo-trl process runs.")


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # cut short by a kill while written: its writer is dead
        return {}


def _held_by(final: Path, lock: Path, holder: dict) -> OutputExistsError:
    return OutputExistsError(
        f"{final} is being written by another gpo-trl process (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, lock {lock}). Wait for it; if that process is gone, delete {lock}.")


def _release(lock: Path, fd: int):
    lock.unlink(missing_ok=True)  # before the flock goes: a racer that opened this file then sees it is gone
    os.close(fd)


# --- Recovery and the swap ----------------------------------------------------------------------------------------


def _leftovers(final: Path, kind: str) -> list[Path]:
    prefix = f".{final.name}.gpo-{kind}-"
    if not final.parent.is_dir():
        return []
    return sorted((p for p in final.parent.iterdir() if p.name.startswith(prefix)), key=_mtime)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by the writer that owns it
        return 0.0


def _recover_locked(final: Path) -> str | None:
    """Repair what a killed writer left (the caller holds the lock). Returns what was done, or None."""
    done = []
    backups = _leftovers(final, "old")
    if not final.exists() and backups:
        fault_point("restore backup")
        os.rename(backups[-1], final)  # killed between the two swaps: back to the previous complete output
        fsync_path(final.parent)
        done.append(f"restored {final} from {backups[-1].name}")
        backups = backups[:-1]
    for leftover in backups + _leftovers(final, "new"):
        fault_point(f"remove {leftover.name}")
        shutil.rmtree(leftover, ignore_errors=True)
        done.append(f"removed {leftover.name}")
    return "; ".join(done) or None


def recover(final: Path) -> str | None:
    """Finish or undo a replacement a killed process left half done (see the module docstring). Cheap when there
    is nothing to do; safe to call before reading or writing `final`."""
    final = Path(final)
    if not (_leftovers(final, "old") or _leftovers(final, "new") or _sibling(final, "lock").exists()):
        return None
    with directory_lock(final):
        return _recover_locked(final)


def _link_or_copy_tree(source: Path, target: Path):
    """`target` gets `source`'s content as hard links (no data copied; a file still being appended to stays one
    file), or copies where the filesystem has no hard links."""
    try:
        shutil.copytree(source, target, copy_function=os.link) if source.is_dir() else os.link(source, target)
    except OSError:
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)


def _fsync_tree(root: Path):
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def write_marker(directory: Path, command: str, files: list[str], **extra):
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "gpo-trl", "command": command,
                                                      "files": sorted(files), **extra}, indent=2))


@contextmanager
def replace_dir(final: Path, command: str, overwrite: bool = False, flag: str = "--overwrite",
                carry: Callable[[str], bool] | None = None, strict: bool = True,
                what: str = "output directory") -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends normally, the staging folder replaces `final` as a whole.

    `carry(name)`: entries of the current `final` to keep (hard-linked into the new one; a training run's
    checkpoints). An exception in the block removes the staging folder and leaves `final` as it was.
    """
    final = Path(final)
    with directory_lock(final):
        _recover_locked(final)
        check_output_dir(final, overwrite=overwrite, flag=flag, strict=strict, what=what)
        staging = _sibling(final, "new", str(os.getpid()))
        fault_point("mkdir staging")
        staging.mkdir()
        try:
            yield staging
            written = [p.name for p in staging.iterdir() if p.name != MARKER]
            carried = [p for p in final.iterdir() if p.name != MARKER and p.name not in written and carry(p.name)] \
                if carry and final.is_dir() else []
            for entry in carried:
                fault_point(f"link {entry.name}")
                _link_or_copy_tree(entry, staging / entry.name)
            fault_point("write marker")
            write_marker(staging, command, written)
            fault_point("fsync staging")
            _fsync_tree(staging)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _swap(final, staging)


def _swap(final: Path, staging: Path):
    backup = _sibling(final, "old", str(os.getpid()))
    if final.exists():
        fault_point("swap 1: final -> backup")
        os.rename(final, backup)
    fault_point("swap 2: staging -> final")
    os.rename(staging, final)
    fsync_path(final.parent)
    if backup.exists():
        fault_point("remove backup")
        shutil.rmtree(backup)
