"""Shared plumbing for commands: where evaluation problems come from, the cached default base
model, run folders."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from handrail.errors import UsageError
from handrail.data import Record, records_from_task
from handrail.datafile import load_records
from handrail.models import cache_dir
from handrail.verifiers import FileTask
from handrail.tasks import DEFAULT_TASK, StepArithmeticTask, get_task


def eval_records(task: str | None, data: str | None, level: int | None = None, n: int | None = None,
                 fields: str | None = None, verifier: str = "exact") -> tuple[StepArithmeticTask | FileTask, list[Record]]:
    """Held-out problems and what checks them: a task's test split (at its post-training level
    unless `level`), or the records of a data file with `verifier`."""
    if data:
        records = load_records(data, fields)
        return FileTask(verifier), records[:n] if n else records
    t = get_task(task or DEFAULT_TASK)
    if level is not None and level not in t.levels:
        raise UsageError(f"--level {level}: task {t.name} has levels {min(t.levels)}-{max(t.levels)}")
    return t, records_from_task(t.split("test", n or t.test_size, level))


def model_folder(spec: str, log=lambda *_: None) -> str:
    """What a command's `--model` names, with 'default' resolved to the embedded base's cached
    folder (built on first use by `handrail pretrain`'s recipe: a few minutes)."""
    return str(default_base_model(log=log)) if spec == "default" else spec


QUICK = dict(max_steps=150, d_model=64, n_layers=2, n_problems=4000, eval_n=100)


def default_base_model(rebuild: bool = False, quick: bool = False, log=print) -> Path:
    """The embedded default base model, built once and cached. `quick` is a much smaller one for
    smoke runs (it leaves little to learn)."""
    import hashlib
    from dataclasses import asdict

    from handrail.pretrain import PretrainConfig, pretrain

    # named by its recipe, so that a changed default builds a new base instead of reusing an old one
    # (keys that only read a data file are left out: the embedded base reads none)
    recipe = {k: v for k, v in asdict(PretrainConfig(**(QUICK if quick else {}))).items() if k != "out"}
    # (keys added later at a value that changes nothing are left out too, so the folder keeps its name)
    same = {k: v for k, v in recipe.items() if k not in ("fields", "verifier") and not (k == "terse_own" and not v)}
    digest = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:8]
    folder = cache_dir() / f"base-{DEFAULT_TASK}-{digest}{'-quick' if quick else ''}"
    result_file = folder / "pretrain_result.json"
    if result_file.exists() and not rebuild:
        r = json.loads(result_file.read_text())
        log(f"base model (cached): {folder}")
    else:
        r = pretrain(PretrainConfig(**{**recipe, "out": str(folder)}), log=log)
    log(f"student pass@1 {r['student_accuracy']:.1%} | teacher pass@1 (solution hint) "
        f"{r['teacher_accuracy']:.1%} | n={r['eval_n']}")
    return folder


def environment(model: str | None = None) -> dict:
    """What reproduces a result besides its config: the code's commit, library versions, the CPU
    instruction set torch dispatches to (floating-point order, hence tiny models' results, differs
    between them), thread count, and the base model's own recipe if handrail built it."""
    import platform
    import subprocess

    import accelerate
    import torch
    import transformers

    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    env = {"handrail_commit": commit, "uncommitted_changes": dirty, "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
           "isa_overrides": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                        "ONEDNN_MAX_CPU_ISA") if k in os.environ}}
    folder = Path(model_folder(model)) if model else None
    if folder is not None and folder.is_dir():
        for name in ("pretrain_config.json", "pretrain_result.json"):
            if (folder / name).exists():
                env["base_" + name.split(".")[0]] = json.loads((folder / name).read_text())
    return env


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
        from handrail.models import first_line

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
