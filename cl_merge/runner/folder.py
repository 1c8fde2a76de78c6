"""The run folder: every finished step leaves an artifact here, written
atomically, and a rerun skips the steps whose artifact exists. That is
resume, and it is also how fine-tunes run as separate cluster jobs (each job
writes its stage's artifacts; ``cl-merge run`` picks them up).

A run folder belongs to one resolved config: ``run.json`` records its
fingerprint and a rerun with a different config is refused — unless the
folder holds no finished artifact yet (only ``run.json``/``config.yaml``, logs,
checkpoints of an unfinished fine-tune): such a folder is taken over.

Concurrency: a run holds ``.cl_merge.lock`` at the folder's root (an
``flock`` on a file naming the holder's host and pid), so a second run on the
same folder is refused with the holder named; a lock file whose process is
gone is taken over. ``--stage`` jobs of a job array lock only the artifact
they write (``artifact_lock``), so they share one folder. Taking a lock
removes the temp files a killed writer left under it (``.<name>.*.tmp*``,
from ``cl_merge.core.io``'s atomic writers), except under a folder another
live process has locked.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from cl_merge.core.io import atomic_write_json, atomic_write_text, is_temp_file
from cl_merge.errors import ClMergeError, ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = ".cl_merge.lock"
MANIFEST, CONFIG = "run.json", "config.yaml"


class FolderLockedError(ClMergeError):
    """Another live process holds the lock of a run folder or an artifact."""


# ---------------------------------------------------------------------- locks
class _Lock:
    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        self.count = 1


_HELD: dict[Path, _Lock] = {}  # this process's locks, by resolved path (re-entrant within the process)


def _holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (holder unknown)"
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{when}"


def _try_flock(fd: int, path: Path) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without flock: run unguarded rather than not at all
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            log.warning("%s: the file system does not support locks; concurrent runs are not detected", path)
            return True
        raise


def acquire_lock(path: str | os.PathLike, what: str) -> Path:
    """Take the lock file ``path`` for this process or raise ``FolderLockedError``
    naming the holder. Re-entrant within a process; released by
    ``release_lock`` or at exit. A lock file left by a process that is gone
    (no ``flock`` on it any more) is taken over with a warning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        _HELD[key].count += 1
        return key
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_flock(fd, path):
            holder = _holder(path)
            os.close(fd)
            raise FolderLockedError(f"{what} is in use by {_describe(holder)} (lock {path}); wait for that run "
                                    "to finish or choose another --out")
        # the file may have been released and removed between our open and our flock: lock the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _holder(path)
        if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            log.warning("%s: taking over the lock left by %s, which is no longer running", what, _describe(previous))
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, body, 0)
        _HELD[key] = _Lock(path, fd)
        return key
    raise FolderLockedError(f"{what}: could not take the lock {path} (it keeps being replaced)")


def release_lock(key: Path) -> None:
    lock = _HELD.get(key)
    if lock is None:
        return
    lock.count -= 1
    if lock.count > 0:
        return
    del _HELD[key]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock.path)  # while still holding it: a waiter re-checks the inode
    os.close(lock.fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _HELD[key].count = 1
        release_lock(key)


def locked_elsewhere(folder: Path) -> bool:
    """Whether another live process holds ``folder``'s lock."""
    path = Path(folder) / LOCK_NAME
    if not path.exists() or path.resolve() in _HELD:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False
    finally:
        os.close(fd)  # also drops the shared lock


def remove_stale_temp_files(root: Path) -> list[Path]:
    """Delete the temp files killed writers left under ``root`` (not under a
    folder another live process has locked: its writes are in flight)."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d != "wandb"]  # wandb's own files, not ours
        if here != root and locked_elsewhere(here):
            dirnames.clear()
            continue
        for name in filenames:
            if is_temp_file(name):
                with contextlib.suppress(FileNotFoundError):
                    (here / name).unlink()
                    removed.append(here / name)
    if removed:
        log.info("removed %d stale temp file(s) under %s", len(removed), root)
    return removed


@contextlib.contextmanager
def artifact_lock(folder: str | os.PathLike, what: str | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock while its artifact is written (a ``--stage`` job,
    or the run's own fine-tune of that stage); stale temp files there go first."""
    folder = Path(folder)
    key = acquire_lock(folder / LOCK_NAME, what or f"{folder}")
    try:
        remove_stale_temp_files(folder)
        yield
    finally:
        release_lock(key)


# ---------------------------------------------------------------------- the folder
def _finished_artifacts(root: Path) -> Iterator[Path]:
    """Files a finished step leaves (artifacts, records), not the folder's own
    bookkeeping, logs or an unfinished fine-tune's checkpoints."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "logs", "wandb")]
        for name in filenames:
            if name in (MANIFEST, CONFIG, LOCK_NAME) or is_temp_file(name):
                continue
            if name.endswith((".safetensors", ".json", ".csv", ".md", ".png")):
                yield Path(dirpath) / name


class RunFolder:
    """``lock=False`` for ``--stage`` jobs, which lock per artifact instead."""

    def __init__(self, root: str | Path, fingerprint: str, resolved_config: dict[str, Any], *, lock: bool = True):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"run folder {self.root} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = acquire_lock(self.root / LOCK_NAME, f"run folder {self.root}") if lock else None
        manifest = self.root / MANIFEST
        recorded = None
        if manifest.exists():
            try:
                recorded = json.loads(manifest.read_text()).get("fingerprint")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                recorded = "corrupt"
        if recorded != fingerprint:
            if recorded is not None:
                finished = next(_finished_artifacts(self.root), None)
                if finished is not None:
                    what = "has a corrupt run.json" if recorded == "corrupt" else \
                        f"was written by a different config (fingerprint {recorded}, this config {fingerprint})"
                    raise ConfigError(
                        f"run folder {self.root} {what} and holds results ({finished.relative_to(self.root)}); "
                        "refusing to resume it: choose another --out or delete the folder"
                    )
                log.warning("run folder %s holds no finished step of its previous config; taking it over", self.root)
            atomic_write_text(self.root / CONFIG, yaml.safe_dump(resolved_config, sort_keys=False))
            atomic_write_json(manifest, {"fingerprint": fingerprint})
        if self._lock is not None:
            remove_stale_temp_files(self.root)
        self.fingerprint = fingerprint

    def release(self) -> None:
        if self._lock is not None:
            release_lock(self._lock)
            self._lock = None

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def has(self, *parts: str) -> bool:
        """Whether the artifact exists; a JSON record that does not parse (a
        disk error, a hand edit) is discarded with a warning and counts as
        missing, so its step is redone."""
        target = self.path(*parts)
        if not target.exists():
            return False
        if target.suffix == ".json":
            try:
                json.loads(target.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("%s is corrupt (%s); discarding it and redoing that step", target, exc)
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                return False
        return True

    def read_json(self, *parts: str) -> Any:
        from cl_merge.core.io import read_json

        return read_json(self.path(*parts))

    def write_json(self, obj: Any, *parts: str) -> Path:
        target = self.path(*parts)
        atomic_write_json(target, obj)
        return target
