"""Writing a pruned checkpoint to `--out` without ever losing data.

A run takes its destination in hand before any work (`Destination`): it locks it, finishes the
leftovers of killed runs, checks that it may replace what is there, and creates its temporary
sibling directory, so a bad destination fails in seconds rather than after hours of pruning.

Beside `OUT` live only lmprune's own hidden siblings:
  `.OUT.lock`      the run's exclusive lock (flock), removed when the run ends;
  `.OUT.tmp-PID`   the checkpoint being written by process PID, renamed to `OUT` when complete;
  `.OUT.old-PID`   during an `--overwrite`, the previous output between the two renames of the swap;
  `.OUT.partial`   a streamed run's checkpoint being written block by block (model/block_store.py): a
                   stable name, so a killed run's finished blocks are found and continued by the next run.
The report is the last file written into a checkpoint, so a directory holding it is complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil

from ..errors import LmpruneError
from ..log import logger
from ..paths import normalize_modes, os_reason
from ..report import REPORT_NAME, write_json

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class Destination:
    """`--out` for one run: locked, checked and with its temporary directory made before any work.

    Use as a context manager; `save` writes the checkpoint and swaps it into place. Whatever happens,
    leaving the context removes the temporary directory and the lock (and any parent directories it
    had to create, if the run failed).
    """

    def __init__(self, out: str, overwrite: bool = False, expected_bytes: int | None = None,
                 resumable: bool = False):
        # Symlinks resolved: the swap renames the directory itself, and two names for one directory
        # must share one lock.
        self.out = os.path.realpath(out)
        self.overwrite = overwrite
        self.expected_bytes = expected_bytes
        self.parent, base = os.path.split(self.out)
        self._sibling = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)")
        self.lock_path = os.path.join(self.parent, f".{base}.lock")
        self.partial = os.path.join(self.parent, f".{base}.partial")
        self.resumable = resumable
        self.tmp = self.partial if resumable else os.path.join(self.parent, f".{base}.tmp-{os.getpid()}")
        self.keep_partial = False  # set once the partial output holds work worth resuming
        self._old = os.path.join(self.parent, f".{base}.old-{os.getpid()}")
        self._lock_fd: int | None = None
        self._made_parents: list[str] = []

    def owns(self, path: str) -> bool:
        """Whether the resolved `path` is, or lies in, one of the hidden siblings `out` uses (whichever run
        made them): a run writes, locks or removes those, so none may be an input."""
        if os.path.commonpath([path, self.parent]) != self.parent or path == self.parent:
            return False
        first = os.path.relpath(path, self.parent).split(os.sep)[0]
        return (os.path.join(self.parent, first) in (self.lock_path, self.partial)
                or self._sibling.fullmatch(first) is not None)

    def __enter__(self) -> "Destination":
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise LmpruneError(f"--out {self.out!r} exists and is not a directory")
        try:
            _make_dirs(self.parent, self._made_parents)
            self._lock_fd = _acquire_lock(self.lock_path, self.out)
            # A killed streamed run's partial output survives a failed start; the run decides later.
            self.keep_partial = self.resumable and os.path.isdir(self.tmp)
            self._restore_interrupted_swap()
            self._remove_stale_siblings()
            self._check_replaceable()
            if not (self.resumable and os.path.isdir(self.tmp)):
                os.mkdir(self.tmp)
            self._check_free_space()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError):
                raise LmpruneError(f"cannot write beside --out {self.out!r}: {os_reason(exc)}") from None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock_fd is not None:  # without the lock, the temporary directory is not this run's
            if not self.keep_partial:
                shutil.rmtree(self.tmp, ignore_errors=True)
            _release_lock(self._lock_fd, self.lock_path)
            self._lock_fd = None
        for path in reversed(self._made_parents):
            try:
                os.rmdir(path)  # only while empty (a failed run): never removes anything but what it made
            except OSError:
                break

    def save(self, model, tokenizer, report: dict, check=None, finish=None) -> None:
        """Write the checkpoint into the temporary directory, then swap it into `out`. `check(tmp)`, if given,
        reads the written files first and raises to keep them from ever reaching `out`; `finish(tmp)`, if
        given, then rewrites them before the report marks them complete (e.g. packs them)."""
        try:
            model.save_pretrained(self.tmp)
            tokenizer.save_pretrained(self.tmp)
            if check is not None:
                check(self.tmp)
            if finish is not None:
                finish(self.tmp)
            write_json(os.path.join(self.tmp, REPORT_NAME), report)  # last: it marks a complete checkpoint
        except OSError as exc:
            raise LmpruneError(f"cannot write the checkpoint to {self.tmp!r}: {os_reason(exc)}") from None
        self.commit()

    def commit(self) -> None:
        """Swap the complete checkpoint in the temporary directory into `out`."""
        # Whatever appeared in `out` since the start (another program, not another lmprune: the lock)
        # must pass the same test again.
        self._check_replaceable()
        try:
            normalize_modes(self.tmp)  # savers differ (safetensors writes 0600): every file gets open()'s mode
            self._swap()
        except OSError as exc:
            raise LmpruneError(f"cannot move the checkpoint into {self.out!r}: {os_reason(exc)}") from None

    def _swap(self) -> None:
        if not os.path.isdir(self.out) or not os.listdir(self.out):
            os.replace(self.tmp, self.out)  # renaming over an empty directory is one atomic step
            return
        # Two renames, the old output kept whole until the new one is in place. A kill between them
        # leaves `out` missing and `.OUT.old-PID` complete (it still holds its report): the next run
        # puts it back (_restore_interrupted_swap). Its report is deleted first when it is discarded,
        # so a partly deleted old output is never mistaken for a complete one.
        os.rename(self.out, self._old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            os.rename(self._old, self.out)
            raise
        os.remove(os.path.join(self._old, REPORT_NAME))
        shutil.rmtree(self._old, ignore_errors=True)

    def _siblings(self, kind: str) -> list[tuple[str, int]]:
        found = []
        for name in os.listdir(self.parent):
            match = self._sibling.fullmatch(name)
            if match and match.group(1) == kind:
                found.append((os.path.join(self.parent, name), int(match.group(2))))
        return found

    def _restore_interrupted_swap(self) -> None:
        """`out` missing (or empty) while a dead run's complete `.OUT.old-PID` exists: a kill hit the
        swap. Put the old output back."""
        if os.path.isdir(self.out) and os.listdir(self.out):
            return
        complete = [path for path, pid in self._siblings("old")
                    if not _pid_alive(pid) and os.path.isfile(os.path.join(path, REPORT_NAME))]
        if complete:
            newest = max(complete, key=os.path.getmtime)
            os.replace(newest, self.out)
            logger.warning(f"restored {self.out} from {os.path.basename(newest)}, left by an interrupted "
                           "--overwrite")

    def _remove_stale_siblings(self) -> None:
        """Temporary and old directories of dead processes are leftovers of killed runs."""
        # The lock already keeps out every live lmprune run on this `out`; the PID test also spares
        # directories of a live process that does not take the lock (an older lmprune).
        for kind in ("tmp", "old"):
            for path, pid in self._siblings(kind):
                if not _pid_alive(pid) or pid == os.getpid():
                    shutil.rmtree(path, ignore_errors=True)

    def _check_replaceable(self) -> None:
        """An empty or missing `out` may be written; a non-empty one only with --overwrite, and only
        if lmprune wrote it: --overwrite never deletes an arbitrary tree."""
        if not os.path.isdir(self.out) or not os.listdir(self.out):
            if os.path.isdir(self.out) and not os.access(self.out, os.W_OK):
                raise LmpruneError(f"--out {self.out!r} is not writable")
            return
        if not is_lmprune_output(self.out):
            raise LmpruneError(
                f"output directory {self.out!r} is not empty and holds no {REPORT_NAME}: it was not written "
                "by lmprune, so it is never replaced, not even with --overwrite (choose another --out)"
            )
        if not self.overwrite:
            raise LmpruneError(f"output directory {self.out!r} is not empty (use --overwrite to replace it)")
        if not os.access(self.out, os.W_OK | os.X_OK):
            raise LmpruneError(f"--out {self.out!r} is not writable, so it cannot be replaced")

    def _check_free_space(self) -> None:
        if not self.expected_bytes:
            return
        free = shutil.disk_usage(self.tmp).free
        if free < self.expected_bytes:
            raise LmpruneError(
                f"not enough free space for the checkpoint beside --out {self.out!r}: "
                f"about {_size(self.expected_bytes)} needed, {_size(free)} free"
            )


def is_lmprune_output(path: str) -> bool:
    """A directory lmprune wrote: it holds a report lmprune can read back."""
    try:
        with open(os.path.join(path, REPORT_NAME), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "settings" in report and "layers" in report


def checkpoint_bytes(model_dir: str | None, dtype: str = "auto") -> int | None:
    """About how many bytes the pruned checkpoint of a local model takes: its files, its weights
    rescaled when --dtype changes their precision. None when the model is not on this disk yet."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    weights = other = 0
    for entry in os.scandir(model_dir):
        if entry.is_file():  # follows symlinks (hub cache snapshots point into blobs/)
            if entry.name.endswith(_WEIGHT_SUFFIXES):
                weights += entry.stat().st_size
            else:
                other += entry.stat().st_size
    source = _config_dtype(model_dir)
    if dtype in _DTYPE_BYTES and source in _DTYPE_BYTES:
        weights = weights * _DTYPE_BYTES[dtype] // _DTYPE_BYTES[source]
    return weights + other


def _config_dtype(model_dir: str) -> str | None:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def _acquire_lock(path: str, out: str) -> int:
    """An exclusive flock on `path`; fails at once if another run holds it. The kernel drops the
    lock when its process dies, however it dies, so a stale lock file never blocks a later run."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise LmpruneError(
                f"another lmprune run (pid {holder}) is writing to {out!r}: wait for it to finish "
                "or choose another --out"
            ) from None
        # The previous holder unlinks the file as it releases it: a lock taken on that unlinked file
        # would not exclude a run that creates a new one, so try again on the file now at `path`.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release_lock(fd: int, path: str) -> None:
    try:
        os.unlink(path)  # while still holding it: see _acquire_lock
    except FileNotFoundError:
        pass
    os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _make_dirs(path: str, made: list[str]) -> None:
    """os.makedirs that appends each directory it creates to `made` (outermost first), as it goes."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory)
        made.append(directory)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
