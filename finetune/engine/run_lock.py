"""One training process per run folder: an exclusive lock on ``<run folder>/.lock`` while a run trains in it.

The lock is ``fcntl.flock`` on that file. The kernel drops it when the process ends, however it ends
(kill -9 and power loss included), so a lock is never stale and ``--resume`` after a kill just works. The
file also records who holds it (pid, the process's start time, host, since when), for the message a
second process gets, and is removed when the lock is released. Where flock is unavailable (no
``fcntl``, or a file system without locks) the record alone decides: it counts while a process with that
pid and start time lives on this host.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from finetune.errors import RunError

LOCK_FILE = ".lock"


class RunLock:
    """The lock of one run folder, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.file = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._made_folder = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create the folder if needed and lock it; a RunError naming the holder when another process has it."""
        if self.held:
            return
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _flock(fd, exclusive=True)
            holder = read_holder(self.file) if locked is not True else None
            if locked is None and holder is not None and holder["pid"] == os.getpid():
                holder = None
            if locked is False or (locked is None and holder is not None and _alive(holder)):
                os.close(fd)
                raise in_use_error(self.folder, holder)
            if _same_file(fd, self.file):
                record = {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname(),
                          "since": time.time()}
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(record).encode())
                self._fd = fd
                return
            # The file was removed or replaced between open and flock (its holder released it, or an
            # --overwrite moved the folder away): that lock guards nothing; lock the file there now.
            os.close(fd)
        raise RunError(f"output.dir: cannot lock {self.file}: it keeps being replaced; is another program "
                       "deleting files in the run folder?")

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock; a folder that :meth:`acquire` created
        and nothing else was written to goes too (a run refused at the last moment leaves nothing)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.file):
                self.file.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder now: the kernel lock still goes with the close below
        finally:
            os.close(self._fd)
            self._fd = None
        if self._made_folder:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass


def holder_now(folder: Path, *, locked_before: float | None = None) -> dict[str, Any] | None:
    """The record of another process that holds ``folder``'s lock now (and took it before ``locked_before``,
    a time.time()), else None. Reads only."""
    path = Path(folder) / LOCK_FILE
    holder = read_holder(path)
    if holder is None or holder["pid"] == os.getpid() or not _alive(holder):
        return None
    since = holder.get("since")
    if locked_before is not None and isinstance(since, (int, float)) and since >= locked_before:
        return None
    # The record says its process lives (maybe on another host): confirm with the lock itself.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        free = _flock(fd, exclusive=False)  # a shared lock: taken only when no one holds the exclusive one
    finally:
        os.close(fd)  # and released with it
    return None if free is True else holder


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def in_use_error(folder: Path, holder: dict[str, Any] | None) -> RunError:
    if holder is None:
        who = "another process"
        stop = "stop it"
    else:
        pid, host = holder["pid"], holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        since = holder.get("since")
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" \
            if isinstance(since, (int, float)) else ""
        who = f"another finetune run (pid {pid}{where}{when})"
        stop = f"stop it (Ctrl-C, or kill {pid}: it checkpoints and --resume continues it)"
    return RunError(f"output.dir: {folder} is in use: {who} is training in it, and two runs in one folder would "
                    "overwrite each other's checkpoints; nothing was changed. Wait for it to finish, or "
                    f"{stop}, or choose another output.dir for this run.")


def _flock(fd: int, *, exclusive: bool) -> bool | None:
    """Try to lock without waiting: True when locked, False when another process holds it, None when
    this platform or file system has no flock. A shared lock is only a probe: it is released at once."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    if not exclusive:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None without
    /proc or for a process that is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # exited, not yet reaped: its locks are gone
        return None
    return int(fields[19])  # fields[0] is field 3 (the state)


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the record's process still runs: the same pid *and* start time (a pid is reused); without
    /proc, whether any process has that pid. A process on another host cannot be checked: assumed alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder["pid"]
    if Path("/proc/self/stat").exists():
        started = _start_time(pid)
        return started is not None and holder.get("started") in (None, started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
