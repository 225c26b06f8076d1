"""Run folders: writes that fail with one clear line, one run per folder, output folders checked
before anything is written, and progress bars that suit a terminal and a log file alike."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path


def cache_dir() -> Path:
    """Where handrail keeps what it builds once: the default base, converted GGUF models."""
    return Path(os.environ.get("HANDRAIL_CACHE", Path.home() / ".cache" / "handrail"))


class WriteError(OSError):
    """A write that failed (no space left, a read-only or over-quota filesystem): the message names
    the path and the reason. The command exits with status 4."""


def _write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    text = str(e)  # torch's and safetensors' writers report a short write as a RuntimeError of their own
    return type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and any(
        k in text for k in ("PytorchStreamWriter", "inline_container", "file write failed", "No space left")))


def _reason(e: BaseException, path: Path) -> str:
    import shutil

    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        from handrail.errors import first_line

        reason = first_line(e)
    if free is not None and free < 64 << 20:
        reason += f"; {free / (1 << 20):.1f} MiB free on its filesystem"
    return reason


@contextlib.contextmanager
def writing(path: str | Path, partial: str | Path | None = None):
    """Runs a write; if it fails for lack of space or permission, removes `partial` (what the write
    left half-done: a file or a folder) and raises WriteError naming `path` and the reason."""
    import shutil

    try:
        yield
    except Exception as e:  # noqa: BLE001 - only write failures are turned into WriteError
        if not _write_failure(e):
            raise
        if partial is not None:
            partial = Path(partial)
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({_reason(e, Path(path))})") from None


LOCK = ".handrail.lock"


class FolderLock:
    """One run per folder: an exclusive lock on FOLDER/.handrail.lock, held while the run lives
    (train, pretrain, compare, demo). The kernel drops it when the process ends, however it ends,
    so a run killed with SIGKILL leaves nothing that blocks --resume. The file keeps the holder's
    pid, for the message a second run gets. Where the platform has no flock (Windows), no lock."""

    def __init__(self, folder: str | Path, option: str = "--out"):
        from handrail.config import ConfigError

        self.file = None
        try:
            import fcntl
        except ImportError:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(f"{option} {folder}: another run (pid {holder}) is using this folder; wait for it "
                              f"to end or choose another {option}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the lock
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def check_out(path: str, option: str = "--out") -> None:
    """Refuse an output folder that cannot be made, before anything is written anywhere."""
    from handrail.config import ConfigError

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a folder")
    parent = target
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {parent} is not writable")


class _Lines:
    """What a progress bar writes, as whole lines for a file: tqdm redraws a line by starting it
    with a carriage return, which a log file keeps (a closing message then lands on the same line
    as the last bar). Each redraw becomes its own line, and empty ones are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # a nested bar's cursor moves mean nothing in a file
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, unit: str, show: bool = True, **kw):
    """A progress bar. At a terminal it redraws as it goes; in a log file or a scheduler's output
    (no terminal) it writes a whole line every 30 s instead of one redraw per step. HANDRAIL_NO_BAR=1
    hides it (compare's worker processes set it)."""
    import sys

    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=interactive, mininterval=0.1 if interactive else 30,
                file=None if interactive else _Lines(sys.stderr), ascii=None if interactive else True,
                disable=not show or bool(os.environ.get("HANDRAIL_NO_BAR")), **kw)
