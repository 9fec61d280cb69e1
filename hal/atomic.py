"""Atomic file writing: the one place in HAL that replaces a file so that readers see either the
old complete file or the new complete file, never a part.

A write goes to a temporary file in the destination's folder, named ``.NAME.PID.RANDOM.tmp``,
created with mode ``0o666`` so that the process umask decides the final mode (0644 under the usual
umask 022, the same as ``open(path, "w")``). The file is flushed and fsynced, renamed over the
destination with ``os.replace``, and the folder is fsynced so the rename itself survives a power
loss. On any failure the temporary file is removed. A writer killed with SIGKILL leaves its
temporary file behind; the next write into that folder removes every temporary file whose PID is
no longer running (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")


def temporary_name(final_name: str) -> str:
    """A fresh temporary file name for ``final_name``: ``.FINAL_NAME.PID.RANDOM.tmp`` (hidden, same folder)."""
    return f".{final_name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def temporary_owner(file_name: str) -> int | None:
    """The PID that created the temporary file ``file_name``, or None when the name is not one of ours."""
    m = _TEMP_NAME.match(file_name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a PID of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def fsync_dir(folder) -> None:
    """fsync ``folder`` so that renames and creations inside it are on disk. A no-op where the
    platform cannot open a folder (Windows)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder) -> list[str]:
    """Delete the temporaries in ``folder`` left by writers that were killed: files (and folders
    from :func:`make_temporary_dir`) named ``.NAME.PID.RANDOM.tmp`` whose PID is not running. A
    live writer's (this process's included) temporaries are left alone. Returns the names removed,
    sorted."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid = temporary_owner(entry.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return sorted(removed)


@contextlib.contextmanager
def replacing(path, *, durable: bool = True, parents: bool = False, clean_stale: bool = True):
    """``with replacing(path) as f: f.write(...)``: stream the new content of ``path`` into a binary
    file that replaces ``path`` atomically when the block ends without an exception (and is
    removed, leaving ``path`` as it was, when it raises). Options as :func:`write_bytes`."""
    path = Path(path)
    folder = path.parent
    if parents:
        folder.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temporaries(folder)
    while True:
        tmp = folder / temporary_name(path.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(folder)


def write_bytes(path, data: bytes, *, durable: bool = True, parents: bool = False,
                clean_stale: bool = True) -> Path:
    """Replace the file ``path`` with ``data`` atomically; returns ``path`` as a Path.

    ``durable``: fsync the file before the rename and the folder after it (set False only for bulk
    files whose integrity a durable index vouches for, e.g. golden vectors listed with checksums in
    a manifest written last). ``parents``: create missing parent folders (mode from the umask);
    otherwise a missing folder raises FileNotFoundError. ``clean_stale``: first remove temporary
    files of killed writers from the folder. The new file's mode is ``0o666`` minus the umask.
    Raises OSError (permission, disk full, missing folder) with nothing left behind.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes: data: expected bytes, got {type(data).__name__}")
    with replacing(path, durable=durable, parents=parents, clean_stale=clean_stale) as f:
        f.write(data)
    return Path(path)


def write_text(path, text: str, *, encoding: str = "utf-8", durable: bool = True, parents: bool = False,
               clean_stale: bool = True) -> Path:
    """:func:`write_bytes` of ``text`` encoded with ``encoding`` (UTF-8 by default)."""
    if not isinstance(text, str):
        raise TypeError(f"write_text: text: expected str, got {type(text).__name__}")
    return write_bytes(path, text.encode(encoding), durable=durable, parents=parents, clean_stale=clean_stale)


def make_temporary_dir(folder, final_name: str) -> Path:
    """Create and return a fresh empty folder ``folder/.FINAL_NAME.PID.RANDOM.tmp`` (mode ``0o777``
    minus the umask, as ``mkdir`` gives), to fill and then rename to ``final_name`` in one step.
    A killed process's leftover is removed by :func:`remove_stale_temporaries` like a file."""
    folder = Path(folder)
    while True:
        tmp = folder / temporary_name(final_name)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
