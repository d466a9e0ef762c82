"""Writing outputs safely: a claimed destination, temporary copies that are found and cleaned, atomic moves.

Every writer of the package (release converters, ``export-dit``, LoRA files, the families' writers) goes through
here, with one rule: **a destination is claimed before anything is loaded, and something we did not create is never
replaced unless ``overwrite`` is set.**

* :func:`claim_destination`: ``.<name>.lock`` next to ``dst``, created with ``O_CREAT | O_EXCL`` and holding
  ``pid host start-time``.  A second writer of the same destination fails at once, naming the first; a lock whose
  process is gone (same host) is stale and taken over.  ``dst`` must not exist unless ``overwrite`` (an empty folder
  holds nothing and counts as absent).  SIGTERM is handled like SIGINT while the claim is held (cleanup, then exit
  status 143).
* :func:`atomic_output_dir` / :func:`atomic_write_file`: the output is written to ``.<name>.partial-<pid>`` next to
  ``dst`` and moved into place when complete, with a rename that never replaces what appeared at ``dst`` meanwhile.
  With ``overwrite`` the old content is moved aside (``.<name>.old-<pid>``) first and deleted once the new one is in
  place: a crash never leaves neither.  Leftovers of killed writers (``kill -9``) are removed by the next writer of
  the same destination (an ``old`` copy whose destination is missing is put back).
* What we write follows the user's umask (:func:`apply_umask`), not ``mkdtemp``'s / ``mkstemp``'s 0700 / 0600.

Example:
    >>> with atomic_output_dir("out/model") as tmp:  # doctest: +SKIP
    ...     pipe.save_pretrained(tmp)
    >>> atomic_write_file("model.safetensors", lambda tmp: save_file(sd, str(tmp)))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .io import ConversionError

__all__ = [
    "apply_umask",
    "atomic_output_dir",
    "atomic_write_file",
    "atomic_write_text",
    "claim_destination",
    "current_umask",
    "lock_path",
    "owner_alive",
    "remove_stale",
    "rename_no_replace",
    "terminate_as_interrupt",
]

PARTIAL = "partial"  # .<name>.partial-<pid>[-<n>]: what is being written
OLD = "old"  # .<name>.old-<pid>: the previous content, moved aside during an overwrite
EMPTY_LOCK_GRACE_S = 60.0  # an empty lock file older than this was left by a writer killed while creating it

_HELD: dict[Path, list] = {}  # lock file -> [thread id, depth]: claims are re-entrant within one thread
_OWN: set[Path] = set()  # temporary paths this process is writing now (never stale)
_STATE = threading.Lock()


# ----------------------------------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, recursive: bool = False) -> None:
    """Give ``path`` (and with ``recursive`` everything beneath it) the modes a plain ``mkdir`` / ``open`` would:
    ``0o777 & ~umask`` for folders, ``0o666 & ~umask`` for files (symbolic links are left alone)."""
    mask = current_umask()
    path = Path(path)
    paths = [path]
    if recursive and path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            paths += [Path(root, n) for n in dirs + files]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


# ---------------------------------------------------------------------------------------------------------- owners
def _proc_stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (state) on; ``[]`` where there is none (not Linux, or no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (``/proc/<pid>/stat`` field 22), ``""`` where unknown."""
    stat = _proc_stat(pid)
    return stat[19] if len(stat) > 19 else ""


def _owner_record() -> str:
    pid = os.getpid()
    return f"{pid} {socket.gethostname()} {_start_time(pid)}".strip()


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def owner_alive(record: str) -> bool:
    """Whether the writer a lock records (``pid host [start]``) may still run: another host's always may; on this
    host its pid must exist with the same start time (a reused pid is another process)."""
    parts = record.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    if parts[1] != socket.gethostname():
        return True
    pid = int(parts[0])
    stat = _proc_stat(pid)
    if not _pid_alive(pid) or stat[:1] in (["Z"], ["X"]):  # gone, or a zombie not yet reaped
        return False
    return len(parts) < 3 or len(stat) <= 19 or stat[19] == parts[2]


def _name_pid(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):].split("-")[0]
    return int(rest) if rest.isdigit() else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(dst: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``dst`` left (``.<name>.partial-*``; ``.<name>.old-*`` is put back when ``dst``
    is missing, else removed); call it only while holding ``dst``'s claim.  Returns what was cleaned."""
    dst = Path(dst).absolute()
    cleaned = []
    if not dst.parent.is_dir():
        return cleaned
    for kind in (OLD, PARTIAL):
        prefix = f".{dst.name}.{kind}-"
        for p in sorted(q for q in dst.parent.iterdir() if q.name.startswith(prefix)):
            pid = _name_pid(p.name, prefix)
            if pid is None or p in _OWN or (pid == os.getpid() and kind == OLD):
                continue
            if kind == OLD and not os.path.lexists(dst):
                rename_no_replace(p, dst)  # the crash came between moving the old aside and the new in
            else:
                _remove(p)
            cleaned.append(p)
    return cleaned


# ----------------------------------------------------------------------------------------------------------- locks
def lock_path(dst: str | os.PathLike) -> Path:
    """The lock file that claims ``dst``: ``.<name>.lock`` in the same folder."""
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.lock"


def _read_lock(lock: Path) -> str | None:
    """The lock's record; ``None`` when it is gone; ``""`` when it is still being written."""
    try:
        return lock.read_text().strip()
    except FileNotFoundError:
        return None


def _break_stale(lock: Path, record: str) -> None:
    """Remove a stale lock, unless another writer replaced it since it was read."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if aside.read_text().strip() != record:  # a fresh lock of a live writer: put it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


def _busy(dst: Path, lock: Path, record: str) -> ConversionError:
    parts = record.split() + ["?", "?"]
    return ConversionError(
        f"{dst} is being written by another process (pid {parts[0]} on {parts[1]}, lock {lock}); wait for it to "
        f"finish, or delete the lock if that process is gone"
    )


def _acquire(dst: Path, lock: Path) -> None:
    record = _owner_record()
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            other = _read_lock(lock)
            if other is None:
                continue
            if other == "":
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < EMPTY_LOCK_GRACE_S:
                    raise _busy(dst, lock, other) from None
            elif owner_alive(other):
                raise _busy(dst, lock, other) from None
            _break_stale(lock, other)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record + "\n")
        return
    raise ConversionError(f"{dst}: could not take the lock {lock} (other writers keep taking it)")


@contextlib.contextmanager
def _hold_lock(dst: Path) -> Iterator[bool]:
    """Hold ``dst``'s lock; yields whether this is the outermost hold (re-entrant within one thread)."""
    lock = lock_path(dst)
    me = threading.get_ident()
    with _STATE:
        held = _HELD.get(lock)
        if held is not None and held[0] != me:
            raise ConversionError(f"{dst} is being written by another thread of this process (lock {lock})")
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield False
        finally:
            with _STATE:
                held[1] -= 1
        return
    _acquire(dst, lock)
    with _STATE:
        _HELD[lock] = [me, 1]
    try:
        yield True
    finally:
        with _STATE:
            del _HELD[lock]
        lock.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM is handled like SIGINT: it raises (``SystemExit(143)``), so that ``finally`` /
    ``except BaseException`` cleanups run before the process exits non-zero.  Only in the main thread, and only when
    SIGTERM has its default action (an application's own handler is kept)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------------------- moves
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def rename_no_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (:class:`FileExistsError`), atomically where the system has
    ``renameat2(RENAME_NOREPLACE)`` (Linux), else checked just before a plain rename."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(os.fspath(src)), _AT_FDCWD, os.fsencode(os.fspath(dst)), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), os.fspath(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fspath(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _check_free(dst: Path, overwrite: bool) -> None:
    if os.path.lexists(dst) and not overwrite and not _is_empty_dir(dst):
        raise ConversionError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")


def _commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``dst``: never over something else unless ``overwrite``; with ``overwrite`` the
    old content stays (moved aside) until the new one is in place."""
    if overwrite and os.path.lexists(dst) and not _is_empty_dir(dst):
        old = dst.with_name(f".{dst.name}.{OLD}-{os.getpid()}")
        _remove(old)
        os.replace(dst, old)
        try:
            rename_no_replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                rename_no_replace(old, dst)
            raise
        _remove(old)
        return
    if _is_empty_dir(dst):
        with contextlib.suppress(OSError):
            dst.rmdir()  # an empty folder holds nothing (e.g. made by the user for the output)
    try:
        rename_no_replace(tmp, dst)
    except FileExistsError:
        raise ConversionError(f"{dst} appeared while it was being written (not by us) and is left as it is; pass "
                              f"overwrite=True (--overwrite) to replace it") from None


def _new_partial(dst: Path) -> Path:
    base = dst.with_name(f".{dst.name}.{PARTIAL}-{os.getpid()}")
    tmp, n = base, 0
    while os.path.lexists(tmp) or tmp in _OWN:
        n += 1
        tmp = base.with_name(f"{base.name}-{n}")
    return tmp


# ------------------------------------------------------------------------------------------------------ public API
@contextlib.contextmanager
def claim_destination(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Claim ``dst`` for the block (lock, stale leftovers cleaned, SIGTERM handled); yields its absolute path.

    Raises :class:`~diffusers_wan_ext.utils.io.ConversionError` at once when ``dst`` exists (unless ``overwrite``) or
    another process is writing it.  Re-entrant within one thread (a converter claims early, its writer again).
    """
    dst = Path(dst).absolute()
    _check_free(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _hold_lock(dst) as outermost, terminate_as_interrupt():
        if outermost:
            remove_stale(dst)
            _check_free(dst, overwrite)  # an interrupted overwrite may have been put back
        yield dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``dst`` (``.<name>.partial-<pid>``); move it to ``dst`` only if the block
    completes (see the module docstring).  On any exception (SIGTERM included) it is removed and ``dst`` is left as
    it was."""
    with claim_destination(dst, overwrite) as dst:
        tmp = _new_partial(dst)
        _OWN.add(tmp)
        try:
            tmp.mkdir()
            yield tmp
            apply_umask(tmp, recursive=True)
            _commit(tmp, dst, overwrite)
        finally:
            _remove(tmp)  # gone once committed
            _OWN.discard(tmp)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Write one file: ``write(tmp)`` writes ``.<name>.partial-<pid>`` in the same folder, which then replaces
    ``path`` (only with ``overwrite`` when ``path`` exists); the mode follows the umask.  Returns ``path``."""
    with claim_destination(path, overwrite) as path:
        tmp = _new_partial(path)
        _OWN.add(tmp)
        try:
            write(tmp)
            apply_umask(tmp)
            if overwrite and os.path.lexists(path) and not path.is_dir():
                os.replace(tmp, path)  # one file: the rename itself is the atomic swap
            else:
                _commit(tmp, path, overwrite)
        finally:
            _remove(tmp)
            _OWN.discard(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """:func:`atomic_write_file` for a text file (e.g. ``model_index.json`` rewritten in place)."""
    return atomic_write_file(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)
