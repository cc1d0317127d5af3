"""Where lmprune may write: the one rule for every path it writes (`prune --out`, `eval --json`,
`report --plot`, and any later command's output), checked before any work.

- An output is never one of the run's inputs, never inside one and never holds one (symlinks resolved,
  and each file of an input directory resolved too: a hub snapshot links into a blobs/ directory), not
  even with --overwrite. Nor is it one of the hidden siblings a `--out` directory uses (model/saving.py).
- A file output (`check_output_file`): its directory exists and is writable; it is not a directory nor
  anything but a regular file; an existing file is replaced only with --overwrite. lmprune does not try
  to tell its own files from other programs' (a marker inside a JSON file would change its schema, and a
  plot has none): every existing file needs --overwrite, which names it as the user's choice. A file of
  an lmprune checkpoint is never replaced: the checkpoint would no longer match its report.
- A directory output (`check_output_dir`): never '' (it would mean the current directory), never under
  a regular file. Replacing it is `Destination`'s (model/saving.py): its lock, temporary sibling and
  rename, and --overwrite only over a directory lmprune wrote.
- Every file is written atomically (`atomic_path`: a hidden temporary sibling renamed into place, removed
  on any failure), and every file lmprune writes gets the mode a plain open() gives, 0666 minus the
  umask (`normal_mode`; savers such as safetensors' create 0600 files).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import LmpruneError

# How deep an input directory's files are resolved: a model directory is flat, task data is DIR/task/split.
_INPUT_DEPTH = 2


@dataclass(frozen=True)
class Input:
    """A path the run reads, and how a message names it ("the model directory", "the data file", ...)."""

    path: str
    what: str


def run_inputs(model_dirs: Iterable[str | None] = (), data: Iterable[str | None] = (),
               task_data: str | None = None, reports: Iterable[str] = ()) -> list[Input]:
    """The inputs of one command. Data sources that are not paths (a dataset name) are left out; a
    report given as a directory protects the whole checkpoint directory."""
    inputs = [Input(path, "the model directory") for path in model_dirs if path]
    inputs += [Input(path, "the data file") for path in data if path and os.path.exists(path)]
    if task_data:
        inputs.append(Input(task_data, "the task data directory"))
    inputs += [Input(path, "the checkpoint directory" if os.path.isdir(path) else "the report") for path in reports]
    return inputs


def check_output_dir(out: str, inputs: Iterable[Input], flag: str = "--out") -> None:
    """Refuse an output directory that is '', lies under a regular file, or could touch an input (itself,
    or through the hidden siblings its `Destination` writes, locks and removes beside it)."""
    from .model.saving import Destination

    _check_named(out, flag)
    inputs = list(inputs)
    _check_apart(out, inputs, flag)
    _check_ancestors(out, flag)
    destination = Destination(out)  # only its names: it touches nothing until entered
    for item in inputs:
        if destination.owns(os.path.realpath(item.path)):
            raise LmpruneError(f"{flag} {out!r} would use {item.path!r}, {item.what}, as its temporary or lock "
                               "file: choose another name")


def check_output_file(path: str, inputs: Iterable[Input], overwrite: bool, flag: str) -> None:
    """Refuse an output file that could touch an input, replace a file without --overwrite, or that
    cannot be written (no such directory, a directory, not a regular file, not writable)."""
    from .model.saving import is_lmprune_output

    _check_named(path, flag)
    _check_apart(path, list(inputs), flag)
    _check_ancestors(path, flag)
    target = os.path.realpath(path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise LmpruneError(f"{flag} {path!r}: the directory {parent!r} does not exist (create it first)")
    if os.path.isdir(target):
        raise LmpruneError(f"{flag} {path!r} is a directory: give a file name")
    if os.path.exists(target):
        if not os.path.isfile(target):
            raise LmpruneError(f"{flag} {path!r} exists and is not a regular file: it is never replaced")
        if is_lmprune_output(parent):
            raise LmpruneError(f"{flag} {path!r} is a file of the lmprune checkpoint {parent!r}: it is never "
                               "replaced, not even with --overwrite (choose another name)")
        if not overwrite:
            raise LmpruneError(f"{flag} {path!r} exists (add --overwrite to replace it)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LmpruneError(f"{flag} {path!r}: the directory {parent!r} is not writable")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary sibling of `path` (symlinks resolved) to write; when the block ends without an error
    it gets the normal mode and is renamed over `path`, otherwise it is removed."""
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, normal_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def write_errors(what: str) -> Iterator[None]:
    """An OSError inside (disk full, permissions) becomes one line: "cannot write WHAT: reason"."""
    try:
        yield
    except OSError as exc:
        raise LmpruneError(f"cannot write {what}: {os_reason(exc)}") from None


def normal_mode() -> int:
    """The mode a plain open() gives a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


def normalize_modes(directory: str) -> None:
    """Give `directory`, and every directory and regular file under it, the mode mkdir() and open() give
    (whatever wrote them: mkdtemp makes 0700 directories, safetensors 0600 files)."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(directory, dir_mode)
    for root, directories, files in os.walk(directory):
        for names, mode in ((directories, dir_mode), (files, file_mode)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):  # a link's target is not ours to change
                    os.chmod(path, mode)


def os_reason(exc: OSError) -> str:
    """An OSError's reason for a one-line message: "no space left on device"."""
    return exc.strerror.lower() if exc.strerror else str(exc)


def _umask() -> int:
    # /proc first: setting the umask to read it back would briefly change it for every thread.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_named(path: str, flag: str) -> None:
    if not path:
        raise LmpruneError(f"{flag} is empty: give a path (use . for the current directory)")


def _check_apart(path: str, inputs: list[Input], flag: str) -> None:
    """The output is not an input, inside one, nor holds one or one of an input directory's files."""
    target = os.path.realpath(path)
    for item in inputs:
        source = os.path.realpath(item.path)
        if target == source:
            raise LmpruneError(f"{flag} {path!r} is {item.what} {item.path!r}: an input is never replaced")
        if _inside(target, source):
            raise LmpruneError(f"{flag} {path!r} is inside {item.what} {item.path!r}: choose a path outside it")
        if _inside(source, target):
            raise LmpruneError(f"{flag} {path!r} contains {item.what} {item.path!r}: choose one that does not")
        for file in _resolved_files(source):
            if file == target or _inside(file, target):
                relation = "is" if file == target else "contains"
                raise LmpruneError(f"{flag} {path!r} {relation} {file!r}, a file of {item.what} {item.path!r}")


def _check_ancestors(path: str, flag: str) -> None:
    """The nearest existing directory above `path` must be a directory, not a regular file."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise LmpruneError(f"{flag} {path!r} lies under {ancestor!r}, which is a file, not a directory")


def _inside(path: str, directory: str) -> bool:
    return path != directory and os.path.commonpath([path, directory]) == directory


def _resolved_files(directory: str, depth: int = _INPUT_DEPTH) -> list[str]:
    """Where the files of an input directory really are (its subdirectories' too, `depth` levels)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # not a directory, or unreadable: nothing more to protect than the path itself
        return found
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if depth > 1:
                found += _resolved_files(entry.path, depth - 1)
        else:
            found.append(os.path.realpath(entry.path))
    return found
