"""The one rule for every folder fluxjax writes and later replaces (`convert`'s DST, `train`'s model/).

* A folder is written under a staging name beside its destination (DST.converting-PID) and ends
  with a manifest (fluxjax-manifest.json: which command wrote it, and every entry below it with
  its kind and size: files by size, folders, symbolic links by target).
* Replacing takes only a folder the same command wrote (`owned_why`): every entry of the tree is
  in its manifest with the same kind and size. Anything else (a note in a subfolder, a component
  the user swapped for their own, a folder another command wrote) is refused, naming it.
* The check is made at the start and again at the swap: the new folder becomes DST with one
  atomic rename that fails if anything appeared at DST meanwhile (renameat2 RENAME_NOREPLACE), or,
  replacing, swaps names with the still-owned old DST (RENAME_EXCHANGE), so at every instant DST
  is whole. Nothing that appears at DST during a run is ever removed.
* A lock file beside the destination (DST.lock, `locked`), held with flock for the whole run and
  naming its process, refuses a second run on the same DST; a killed run's lock is no obstacle
  (the kernel drops a flock with its process).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import sys
import threading
from typing import Iterator

from fluxjax.images import fsync_dir, process_alive

MANIFEST = "fluxjax-manifest.json"
STAGING = ".converting-"  # DST + STAGING + pid: where a run writes before the final rename
LEFTOVERS = (STAGING, ".replaced-")  # DST + one of these + pid: what a killed run can leave
LOCK = ".lock"  # DST + LOCK: the lock file of the run writing DST
RUNS = {"convert": "conversion", "train": "training run"}  # writer -> what its leftovers are called

# renameat2(2) flags (linux/fs.h)
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


# -- the manifest -----------------------------------------------------------------------------------


def tree_entries(folder: str) -> dict[str, object]:
    """{path relative to folder: its size (a file), "dir" (a folder) or {"link": target}} for
    everything below `folder`, links not followed; the manifest itself left out."""
    out: dict[str, object] = {}

    def walk(path: str, rel: str) -> None:
        with os.scandir(path) as it:
            for entry in it:
                name = entry.name if not rel else f"{rel}/{entry.name}"
                if name == MANIFEST:
                    continue
                if entry.is_symlink():
                    out[name] = {"link": os.readlink(entry.path)}
                elif entry.is_dir(follow_symlinks=False):
                    out[name] = "dir"
                    walk(entry.path, name)
                else:
                    out[name] = entry.stat(follow_symlinks=False).st_size

    walk(folder, "")
    return out


def write_manifest(folder: str, writer: str) -> None:
    """Record every entry now below `folder` as written by `fluxjax <writer>` (fsynced)."""
    path = os.path.join(folder, MANIFEST)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"writer": writer, "entries": tree_entries(folder)}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def owned_why(folder: str, writer: str) -> str:
    """Why `folder` is not entirely what `fluxjax <writer>` wrote, or "" when it is (an empty folder
    is: nothing can be lost). Checked over the whole tree against its manifest."""
    if os.path.islink(folder):
        return "it is a symbolic link"
    if not os.path.isdir(folder):
        return "it is a file"
    if not os.listdir(folder):
        return ""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            record = json.load(f)
        wrote = record["entries"]
        if not isinstance(wrote, dict):
            raise TypeError("entries is not an object")
    except FileNotFoundError:
        return f"no {MANIFEST} in it"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    if record.get("writer") != writer:
        return f"it was written by fluxjax {record.get('writer')}"
    found = tree_entries(folder)
    extra = [p for p in sorted(found) if p not in wrote]
    extra = [p for p in extra if os.path.dirname(p) not in extra]  # a new folder, not each file in it
    if extra:
        return f"it holds {shown(extra)}, which fluxjax does not write"
    changed = [p for p in sorted(found) if found[p] != wrote[p]]
    if changed:
        return f"{shown(changed)} changed since fluxjax wrote it"
    return ""


def shown(names: list[str]) -> str:
    """The first three names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_creatable(path: str, what: str) -> None:
    """FileExistsError when a folder cannot be made at `path` because an ancestor is a file."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise FileExistsError(f"{path}: cannot be created: {parent} is a file, not a folder; choose another {what}")


# -- the lock ---------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # lock path -> [fd, depth] of the locks this process holds


@contextlib.contextmanager
def locked(target: str, what: str) -> Iterator[None]:
    """Hold target + ".lock" (flock) for the block: a second fluxjax run on `target` is refused in
    one line (FileExistsError) naming the process that holds it. Re-entrant within a process.
    The lock file is removed on the way out; a killed holder's is taken over (its flock died
    with it). `what` names the argument in the message ("DST", "--out")."""
    path = os.path.abspath(target) + LOCK
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "a process starting up"
            os.close(fd)
            raise FileExistsError(f"{target}: another fluxjax run is writing it ({holder}); wait for it to end or "
                                  f"choose another {what}") from None
        # The file may have been removed by the previous holder between our open and flock:
        # then this lock is on an orphan inode; open the path again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}".encode())
    _held[path] = [fd, 1]
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding it: a waiting opener re-checks the inode
        os.close(fd)


# -- staging and the swap ---------------------------------------------------------------------------


@contextlib.contextmanager
def staged(dst: str, writer: str, overwrite: bool) -> Iterator[str]:
    """A fresh folder beside `dst` that becomes `dst`, with its manifest, when the block ends without error.

    Without `overwrite`, DST must still be absent at the end: the rename fails rather than replace
    anything that appeared there (FileExistsError). With it, an existing DST must be, at the start
    and again at the swap, entirely what `fluxjax <writer>` wrote (`owned_why`); the two folders
    then swap names in one atomic step and the old one is removed, if it is still only fluxjax's
    (otherwise it is kept as DST.kept-PID and said so). On a filesystem that cannot swap two
    folders atomically an existing DST is refused before the block runs. On an exception,
    KeyboardInterrupt or SIGTERM the staging folder is removed and the error propagates.
    """
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(dst, writer)
    replacing = os.path.lexists(dst)
    if replacing and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")
    why = replacing and owned_why(dst, writer)
    if why:
        raise FileExistsError(f"{dst}: fluxjax {writer} replaces only a folder it wrote ({why})")
    tmp = f"{dst}{STAGING}{os.getpid()}"
    os.makedirs(tmp)
    try:
        with _sigterm_raises():
            if replacing:
                _check_exchange(tmp, dst)
            yield tmp
            write_manifest(tmp, writer)
            if not replacing:
                _rename_noreplace(tmp, dst)
                fsync_dir(parent)
                return
            why = owned_why(dst, writer)
            if why:
                raise FileExistsError(f"{dst}: changed while fluxjax {writer} ran ({why}); it is left as it is and "
                                      "the new folder was not installed")
            exchange(tmp, dst)  # DST is now the new folder, tmp the old DST
            fsync_dir(parent)
            if owned_why(tmp, writer):  # something arrived in the instant between the check and the swap
                kept = f"{dst}.kept-{os.getpid()}"
                os.rename(tmp, kept)
                print(f"fluxjax {writer}: warning: the replaced {dst} changed during the swap; kept it as {kept}",
                      file=sys.stderr)
            else:
                shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _renameat2(a: str, b: str, flags: int) -> None:
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library", a)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def _rename_noreplace(tmp: str, dst: str) -> None:
    """Rename the folder tmp to dst only if nothing is at dst (os.rename would replace an empty
    folder that appeared there). FileExistsError when something is."""
    try:
        _renameat2(tmp, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(f"{dst}: appeared while fluxjax was writing it; it is left as it is and the new "
                                  "folder was not installed: choose another DST, or remove it and run again") from None
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
    # No RENAME_NOREPLACE here (some network filesystems): os.rename still refuses a non-empty
    # folder, and a file or link at dst is checked for first.
    if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"{dst}: appeared while fluxjax was writing it; it is left as it is and the new "
                              "folder was not installed: choose another DST, or remove it and run again")
    os.rename(tmp, dst)


def exchange(a: str, b: str) -> None:
    """Swap the names of folders `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE): no
    instant exists at which either name is missing. OSError when the system cannot."""
    _renameat2(a, b, _RENAME_EXCHANGE)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check_exchange(tmp: str, dst: str) -> None:
    """Refuse a replacement where the filesystem cannot swap folders (e.g. NFS, most FUSE mounts),
    before the run: two renames would leave a moment with no DST at all."""
    a, b = os.path.join(tmp, ".swap-a"), os.path.join(tmp, ".swap-b")
    os.makedirs(a)
    os.makedirs(b)
    try:
        exchange(a, b)
    except OSError as e:
        raise FileExistsError(f"{dst}: cannot be replaced safely: this filesystem cannot swap two folders in one "
                              f"step ({e.strerror}); remove {dst} yourself, or write to a new folder") from None
    finally:
        os.rmdir(a)
        os.rmdir(b)


def remove_leftovers(dst: str, writer: str = "convert") -> list[str]:
    """Remove what runs writing `dst` killed with SIGKILL left beside it (DST.converting-PID,
    DST.replaced-PID of processes that are gone), saying so on stderr; returns their paths.

    Never DST itself: after the atomic swap the staging name holds the old DST, so a leftover is
    always either an unfinished new folder or an old one already replaced.
    """
    removed = []
    for marker in LEFTOVERS:
        for path in sorted(glob.glob(glob.escape(dst) + marker + "*")):
            pid = path.rsplit(marker, 1)[1]
            if pid.isdigit() and not process_alive(int(pid)):
                print(f"removing {path}, left by an interrupted {RUNS[writer]} (process {pid})", file=sys.stderr)
                shutil.rmtree(path)
                removed.append(path)
    return removed


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into KeyboardInterrupt for the block, so the staging folder gets removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
