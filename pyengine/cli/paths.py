"""Output paths, checked before anything runs, and written after, with one-line failures.

A run that measures for minutes and then cannot write `--trace` into a missing folder has
wasted the minutes: `check_file` / `check_dir` refuse such paths (UsageError: exit 2) before any
rank starts. A write can still fail later (disk full, folder removed meanwhile): `write_outputs`
then reports each failure in one line and goes on, so results already printed stay printed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator

from pyengine.core.errors import UsageError, one_line
from pyengine.core.files import broken_link

TRACE_EXTENSIONS = (".json",)
"""Chrome/Perfetto trace: JSON."""
PNG_EXTENSIONS = (".png",)
"""Gantt chart: the flag is --png, so PNG only (matplotlib infers the format from the name)."""


def check_file(flag: str, path: str | None, extensions: tuple[str, ...]) -> None:
    """`path` can be written as a new or replaced file with one of `extensions`."""
    if path is None:
        return
    if not path:
        raise UsageError(flag, path, "needs a file name")
    if os.path.isdir(path):
        raise UsageError(flag, path, "is a folder; give a file name inside it")
    _check_link(flag, path)
    if os.path.splitext(path)[1].lower() not in extensions:
        raise UsageError(flag, path, f"unsupported extension: use {' or '.join(extensions)}")
    _check_parent(flag, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(flag, path, "exists and is not writable")


def check_dir(flag: str, path: str | None, files: tuple[str, ...] = ()) -> None:
    """`path` is a folder that exists, or one that can be created in an existing folder; in an
    existing one, none of the `files` it will receive is in the way (a folder of that name)."""
    if path is None:
        return
    if not path:
        raise UsageError(flag, path, "needs a folder name")
    _check_link(flag, path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(flag, path, "exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(flag, path, "is a folder that is not writable")
        blocked = _blocked(path, files)
        if blocked:
            raise UsageError(flag, path, f"holds {blocked}, which is not a file; the dump writes a file there")
        return
    _check_parent(flag, path)


def _blocked(folder: str, files: Iterable[str]) -> str | None:
    """The first of `files` that exists in `folder` as a folder (a link to one included), which
    a file cannot replace."""
    return next((name for name in files if os.path.isdir(os.path.join(folder, name))), None)


def check_apart(files: dict[str, str | None], dump_flag: str, dump: str | None,
                dump_files: tuple[str, ...]) -> None:
    """No two output flags name the same path, and no file flag names the dump folder or a file
    the dump writes: the second write would fail after the whole run, or overwrite the first."""
    taken: dict[str, str] = {}
    if dump:
        taken[_same(dump)] = dump_flag
        taken.update({_same(os.path.join(dump, name)): f"{dump_flag} (its {name})" for name in dump_files})
    for flag, path in files.items():
        if not path:
            continue
        other = taken.get(_same(path))
        if other is not None:
            raise UsageError(flag, path, f"is also where {other} writes: give each output its own path")
        taken[_same(path)] = flag


def _same(path: str) -> str:
    """One spelling per file (symlinks resolved, ./ and .. folded)."""
    return os.path.normcase(os.path.realpath(path))


def _check_link(flag: str, path: str) -> None:
    problem = broken_link(path)
    if problem is not None:
        raise UsageError(flag, path, problem)


@contextlib.contextmanager
def fresh_dir(path: str) -> Iterator[str]:
    """A temporary folder beside `path` to write into; once the body is done its files appear in
    `path` whole: a new `path` is renamed into place at once, an existing one gets each file by
    an atomic replace. Concurrent runs onto one folder never leave a half-written file; a
    failure leaves `path` as it was."""
    where = os.path.abspath(path)
    name = f".{os.path.basename(where)}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(os.path.dirname(where), name)
    os.mkdir(tmp)  # not mkdtemp: the folder keeps the user's umask, not 0700
    try:
        yield tmp
        try:
            os.rename(tmp, path)  # a new (or empty) folder: all files at once
            return
        except OSError:
            pass  # an existing folder with files in it: keep them, replace ours one by one
        names = os.listdir(tmp)
        blocked = _blocked(path, names)
        if blocked is not None:  # refuse before replacing any: never a half-updated dump
            raise IsADirectoryError(f"{os.path.join(path, blocked)} is not a file; no file of the dump was written")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_parent(flag: str, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise UsageError(flag, path, f"the folder {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(flag, path, f"the folder {parent} is not writable")


OUTPUT_NAMES = {"--trace": "trace", "--png": "chart", "--dump": "dump"}
"""What each output flag writes, as `wrote <name> <path>` names it."""


def write_outputs(command: str, writes: Iterable[tuple[str, str, Callable[[], None]]]) -> list[str]:
    """Run each (flag, path, write); each says on stderr what it wrote (`wrote trace PATH`), or
    why it could not, in one line. Stderr, so that --json's stdout stays one JSON object.
    Returns the flags whose file was written."""
    done = []
    for flag, path, write in writes:
        try:
            write()
            done.append(flag)
            print(f"wrote {OUTPUT_NAMES.get(flag, flag.lstrip('-'))} {one_line(path)}", file=sys.stderr)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            reason = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]
            print(one_line(f"pyengine {command}: could not write {flag} {path}: {reason}"), file=sys.stderr)
    return done
