"""What is wrong with a file given to be read (`--tokens`, a checkpoint), in the words a user
needs: one home, so every input names a symlink loop, a folder or an unreadable file alike."""

from __future__ import annotations

import errno
import os
import stat


def unreadable_file(path: str) -> str | None:
    """Why `path` cannot be read as a regular file with contents, or None when it can."""
    try:
        info = os.stat(path)
    except OSError as e:
        return _why_not_found(path, e)
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot be read: {os.strerror(e.errno).lower() if e.errno else e}"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    return None


def broken_link(path: str) -> str | None:
    """What is wrong with `path` when it is a symlink that leads nowhere (a loop, or a missing
    target), else None: such a path passes `not os.path.exists` checks yet cannot be created."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        return "is a symlink loop" if e.errno == errno.ELOOP else (
            f"is a symlink to {os.readlink(path)}, which does not exist")
    return None


def _why_not_found(path: str, e: OSError) -> str:
    if e.errno == errno.ELOOP or os.path.islink(path):
        return broken_link(path) or "is a symlink loop"
    if e.errno == errno.ENOENT:
        return "does not exist"
    return f"cannot be read: {os.strerror(e.errno).lower() if e.errno else e}"
