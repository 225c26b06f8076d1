"""A run's checkpoints and its metrics file: what a resumed run reads back, and how it is kept
whole when the process is killed at any moment.

A checkpoint is written beside the good one (`checkpoint.tmp`) and swapped in only once complete
(`state.json` is written last and marks it so); the one it replaces is kept as
`checkpoint.prev`, so a checkpoint damaged later (a disk, a user's hand) falls back to the one
before it. Rows of metrics.jsonl written after the checkpoint a run resumes from are cut, so no
step is logged twice.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from handrail.errors import UsageError
from handrail.errors import first_line
from handrail.runtime.models import load_model, nonfinite_weight, save_model
from handrail.folders import writing


@dataclass
class State:
    """Everything a resumed run needs besides weights and optimizer."""

    step: int = 0
    rollouts: int = 0  # samples spent, the bootstrap stage's included (budget.py)
    bootstrap_rollouts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    nonfinite_steps: int = 0  # steps skipped because their loss or gradient was not finite
    nonfinite_run: int = 0  # of which in a row, up to now


class NonFinite(RuntimeError):
    """Training produced non-finite numbers too often to go on."""


NAMES = ("checkpoint", "checkpoint.old", "checkpoint.prev")  # newest first; .old survives a crash mid-swap


class Checkpoints:
    """The checkpoints of the run in `out`. Writing is done by the main process (`main`); with
    several processes every one calls `save` (each writes its optimizer shards) and `barrier`
    keeps them in step."""

    def __init__(self, out: Path, main: bool = True, barrier=lambda: None):
        self.out, self.main, self.barrier = Path(out), main, barrier

    def complete(self) -> list[Path]:
        """The complete checkpoints, newest first."""
        return [self.out / name for name in NAMES if (self.out / name / "state.json").exists()]

    def load(self, lm, method, device, log) -> tuple[State, dict | Path]:
        """Weights into `lm`, the method's state and the run's State from the newest checkpoint that
        loads, with its optimizer state (loaded by the caller once the optimizer exists: a dict, or
        a sharded run's folder of shards). A damaged one is named and passed over for the one
        before it; if none loads, the error names the file."""
        damaged = []
        for c in self.complete():
            part = c / "state.json"
            try:
                state = State(**json.loads(part.read_text()))
                part = c / "model"
                lm.load_state_dict(load_model(str(part), device=device)[0].state_dict())
                if (c / "optimizer").is_dir():  # written shard by shard (sharding.Shards.save_optimizer)
                    part = c / "optimizer" / ".metadata"
                    if not part.is_file():
                        raise FileNotFoundError("missing")
                    opt_state = c / "optimizer"
                else:
                    part = c / "optimizer.pt"
                    opt_state = torch.load(part, map_location=storage(device), weights_only=True)
                part = c / "method.pt"
                method.load_state_dict(torch.load(part, map_location=storage(device), weights_only=True))
            except Exception as e:  # noqa: BLE001 - any damage: try the previous checkpoint
                damaged.append(f"{part} ({first_line(e)})")
                continue
            if damaged:
                log(f"WARNING: damaged checkpoint file {damaged[0]}; resuming from {c} (step {state.step}) instead")
            return state, opt_state
        raise UsageError(f"cannot resume: damaged checkpoint file {damaged[0]}" +
                         ("; the older ones are damaged too" if len(damaged) > 1 else "; no older checkpoint to fall back to"))

    def save(self, lm, save_optimizer, method, state: State, tokenizer, templates, meta=None) -> None:
        """`save_optimizer(folder)`, called on every process, writes the optimizer's state into the
        new checkpoint's folder (sharded, each process writes its shards: none gathers the whole)."""
        tmp, good, old = self.out / "checkpoint.tmp", self.out / "checkpoint", self.out / "checkpoint.old"
        if self.main:
            check_finite(lm, self.out)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        # a write that fails (a full disk) removes the half-written folder; the previous checkpoint stays
        with writing(tmp, partial=tmp):
            save_optimizer(tmp)
            if self.main:
                save_model(lm, tokenizer, tmp / "model", templates, meta)
                torch.save(method.state_dict(), tmp / "method.pt")
                (tmp / "state.json").write_text(json.dumps(asdict(state)))  # written last: marks it complete
        if self.main:
            if good.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(good, old)
            os.replace(tmp, good)
            if old.exists():  # kept as the previous checkpoint, in case the newest is damaged later
                shutil.rmtree(self.out / "checkpoint.prev", ignore_errors=True)
                os.replace(old, self.out / "checkpoint.prev")
        self.barrier()

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from, so no step appears twice, and a
        last row half-written when the run was killed."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            rows = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    rows.append(line)
            path.write_text("".join(r + "\n" for r in rows))


def check_finite(lm, out: Path) -> None:
    """Never save a model with a NaN or infinite weight (a finite step with a huge learning rate
    can make one)."""
    bad = nonfinite_weight(lm)
    if bad is not None:
        raise NonFinite(f"weight {bad!r} is no longer finite (learning rate too high?); nothing saved, "
                        f"and the last good checkpoint in {out} is kept")


def storage(device):
    """torch.load's map_location: accelerate names a process's CPU 'cpu:0', which torch.load refuses."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cpu" else device
