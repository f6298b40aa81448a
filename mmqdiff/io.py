"""Safe file handling shared by every stage.

Atomic writes: every artefact goes to a temporary file beside its target, then is renamed into place, so an
interrupted run never leaves a half-written checkpoint, image or report behind; a failed write names its target
(a full disk as "no space left on device: <target>"). Temporaries of a writer killed before its rename are removed
by the next write into their folder.
Run locks: one process (or one multi-process run, through its rank 0) owns a run folder at a time.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent
# where the repository's checkpoints/ and configs/ are found: inside an installed package (setup.py ships them as
# mmqdiff/checkpoints/ and mmqdiff/configs/<name>/, beside the model configs), else at a source checkout's root
SHIPPED_ROOTS = (_PACKAGE, _PACKAGE.parent) if (_PACKAGE.parent / "pyproject.toml").is_file() else (_PACKAGE,)


def shipped_path(path: str | Path) -> Path:
    """``path`` itself, unless it is a relative ``checkpoints/...`` or ``configs/...`` path that does not exist from
    the working directory: then the file of that name shipped with the package (the embedded default's weights, the
    user configs), so the shipped configs run from any folder. A file the user has at that path always wins; with no
    shipped file either, ``path`` comes back unchanged for the caller's own "not found" error."""
    path = Path(path)
    if path.is_absolute() or path.parts[:1] not in (("checkpoints",), ("configs",)) or path.exists():
        return path
    return next((root / path for root in SHIPPED_ROOTS if (root / path).exists()), path)


def brief_error(error: BaseException) -> str:
    """``Type: first sentence`` of an exception from a library, for messages of our own that name the file."""
    text = str(error)
    if text.startswith("Weights only load failed"):  # torch's reason sits in the middle of a long text
        unpickler = re.search(r"WeightsUnpickler error: (.*)", text)
        reason = [p for p in text.split("\n\n") if p.strip() and not p.startswith(("Weights only", "Check the doc"))]
        text = ("weights-only loading refused it: " + (unpickler[1] if unpickler else reason[0].strip() if reason
                                                       else "see torch.load"))
    text = " ".join(text.split())
    sentence = re.split(r"(?<=[.!?]) ", text, maxsplit=1)[0]
    return f"{type(error).__name__}: {sentence[:200]}"


def _write_error(path: Path, error: BaseException) -> OSError:
    """An OSError that names ``path`` (torch.save's own errors name no file, or only the temporary one)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(error.errno, f"no space left on device: {path} ({error.strerror}); free space in "
                                    f"{path.parent} and run again")
    if isinstance(error, OSError) and error.errno is not None:
        return OSError(error.errno, f"cannot write {path} ({error.strerror})")  # same subclass: PermissionError...
    return OSError(f"cannot write {path} ({type(error).__name__}: {error})")


_TEMPORARY = re.compile(r"\..+\.tmp([0-9]+)")  # atomic_path's temporaries: .<name>.tmp<pid>
_SWEPT: set[str] = set()  # folders whose stale temporaries this process removed (once each: image folders are big)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries in ``folder`` whose writer no longer runs (killed before its rename)."""
    key = os.path.abspath(folder)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry.name)
            if match and int(match[1]) != os.getpid() and entry.is_file(follow_symlinks=False) \
                    and not _pid_alive(int(match[1])):
                try:
                    Path(entry.path).unlink(missing_ok=True)
                except OSError as e:  # not ours to remove: leave it
                    log.warning("%s: left by process %s, which no longer runs; cannot remove it (%s)", entry.path,
                                match[1], e.strerror)
                else:
                    log.warning("%s: removed a temporary file left by process %s, which no longer runs",
                                entry.path, match[1])


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed. An OSError or
    RuntimeError while writing is re-raised as an OSError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise _write_error(path, e) from e
    finally:
        if tmp.is_file():
            tmp.unlink()


def atomic_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` through a Python file object: a failed write keeps its errno (a full disk reads as such, not
    as torch's "unexpected pos"), and the archive's inner name no longer depends on the file name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def keep_previous(path: str | Path, previous: str | Path) -> None:
    """Make ``previous`` a copy of ``path`` (a hard link where the filesystem allows) without ever leaving ``path``
    absent, so a crash between this and the next write of ``path`` still finds both."""
    path, previous = Path(path), Path(previous)
    with atomic_path(previous) as tmp:
        try:
            os.link(path, tmp)
        except OSError:
            tmp.write_bytes(path.read_bytes())


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` and write and remove a probe file in it, so a run fails before its work, not after."""
    folder = Path(folder)
    probe = folder / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output folder {folder} is not writable ({type(e).__name__}: {e}); choose a writable "
                              "folder") from e


def write_png(path: str | Path, image: torch.Tensor) -> Path:
    """One uint8 [3, H, W] image as a PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    return Path(path)


def png_problem(path: str | Path, size: tuple[int, int]) -> str | None:
    """Why the PNG at ``path`` is not a complete RGB image of ``size`` (width, height), or None if it is."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes every row: a truncated file fails here
            got = (image.format, image.mode, image.size)
            if got != ("PNG", "RGB", tuple(size)):
                return f"{got[0]} {got[1]} {got[2][0]}x{got[2][1]}, expected PNG RGB {size[0]}x{size[1]}"
    except Exception as e:  # PIL raises several types for damaged files
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def read_png_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """uint8 [N, 3, H, W] from PNG files that share one size; errors name the folder and the sizes found."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{Path(paths[0]).parent}: images differ in size {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------ run locks
class RunLockedError(RuntimeError):
    """Another live process holds the lock; the message names it and the way out."""


class RunLock:
    """Exclusive lock on a run folder or output file for a run's lifetime: ``flock`` on a lock file that holds the
    owner's pid, host, start time and command.

    The kernel drops a ``flock`` when its process dies, however it dies, so a lock file whose lock nobody holds is
    stale: its content names the dead owner, which is reported and taken over. ``release`` removes the file.
    """

    def __init__(self, path: str | Path, what: str):
        """``what`` names the locked thing in messages, e.g. "calibration run folder outputs/calib_k4"."""
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OSError(e.errno, f"cannot lock {self.path} ({e.strerror})") from e
                raise RunLockedError(f"{self.what} is in use by {_describe(holder)} (lock file {self.path}); wait "
                                     "for that run to finish or stop it, or use another folder") from None
            try:  # the file may have been released (unlinked) between our open and our lock: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            log.warning("%s: taking over a stale lock left by %s, which no longer runs", self.path, _describe(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock; does nothing when not held."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then finds no file, or its own new one
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any] | None:
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"content": data[:200].decode(errors="replace")}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    if "pid" not in holder:
        return f"an unknown owner ({holder.get('content')!r})"
    return (f"pid {holder['pid']} on host {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command')})")
