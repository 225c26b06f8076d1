"""Where a command's inputs come from: its held-out problems, its model (with 'default' resolved
to the embedded base, built and cached on first use), and what besides its config reproduces a
result."""

from __future__ import annotations

import json
import os
from pathlib import Path

from handrail.errors import UsageError
from handrail.data.records import Record, records_from_task
from handrail.data.datafile import load_records
from handrail.folders import cache_dir
from handrail.commands.pretrain import PretrainConfig, pretrain
from handrail.data.verifiers import FileTask
from handrail.data.tasks import DEFAULT_TASK, StepArithmeticTask, get_task


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
