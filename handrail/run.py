"""Shared plumbing for commands: where evaluation problems come from, the cached default base
model, run folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

from handrail.data import Record, load_records, records_from_task
from handrail.tasks import DEFAULT_TASK, StepArithmeticTask, get_task


def cache_dir() -> Path:
    return Path(os.environ.get("HANDRAIL_CACHE", Path.home() / ".cache" / "handrail"))


def eval_records(task: str | None, data: str | None, level: int | None = None,
                 n: int | None = None) -> tuple[StepArithmeticTask | None, list[Record]]:
    """Held-out problems: a task's test split (at its post-training level unless `level`), or
    the records of a data file."""
    if data:
        records = load_records(data)
        return None, records[:n] if n else records
    t = get_task(task or DEFAULT_TASK)
    return t, records_from_task(t.split("test", n or t.test_size, level))


QUICK = dict(max_steps=150, d_model=64, n_layers=2, n_problems=4000, eval_n=100)


def default_base_model(rebuild: bool = False, quick: bool = False, log=print) -> Path:
    """The embedded default base model, built once and cached. `quick` is a much smaller one for
    smoke runs (it leaves little to learn)."""
    from handrail.pretrain import PretrainConfig, pretrain

    folder = cache_dir() / f"base-{DEFAULT_TASK}-v7{'-quick' if quick else ''}"
    result_file = folder / "pretrain_result.json"
    if result_file.exists() and not rebuild:
        r = json.loads(result_file.read_text())
        log(f"base model (cached): {folder}")
    else:
        r = pretrain(PretrainConfig(out=str(folder), **(QUICK if quick else {})), log=log)
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
    from handrail.models import resolve

    folder = resolve(model) if model else None
    if folder is not None and folder.is_dir():
        for name in ("pretrain_config.json", "pretrain_result.json"):
            if (folder / name).exists():
                env["base_" + name.split(".")[0]] = json.loads((folder / name).read_text())
    return env
