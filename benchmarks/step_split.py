"""Where a training step's time goes: wall-clock timers around each part of the loop.

    python benchmarks/step_split.py [--model runs/base] [--method self-distill] [--rollouts 512] [--repeat 2]

Each part (sampling, `score` (the teacher pass for self-distillation), the student's forward with
the loss, backward, the optimizer) is timed by wrapping the function the loop calls, for
--rollouts of the real loop with the lab's settings (16 completions a step, 64 tokens, 2 threads,
no evaluation). Timers, not a profiler: cProfile and torch.profiler add per-call costs that
inflate exactly the small operations being measured. Prints ms per step for each part, per repeat
(each repeat a fresh run in this process; the machine's speed drifts, so compare within a run).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch

import handrail.train as T
from handrail.methods import METHODS
from handrail.run import default_base_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--method", default="self-distill")
    ap.add_argument("--rollouts", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    spent = collections.defaultdict(float)

    def timed(owner, name, part):
        inner = getattr(owner, name)

        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return inner(*args, **kw)
            finally:
                spent[part] += time.perf_counter() - t
        setattr(owner, name, run)

    cls = METHODS[a.method]
    timed(T, "sample", "sampling")
    timed(cls, "score", "score (teacher pass)")
    timed(cls, "student_loss", "student forward + loss")
    timed(torch.Tensor, "backward", "backward")
    timed(torch.optim.AdamW, "step", "optimizer")
    model = a.model or str(default_base_model())
    for r in range(a.repeat):
        spent.clear()
        with tempfile.TemporaryDirectory() as out:
            s = T.train(T.TrainConfig(model=model, out=out, method=a.method, rollouts=a.rollouts, max_new_tokens=64,
                                      eval_n=0, checkpoint_every=0, threads=a.threads), log=lambda *_: None)
        n = s["step"]
        parts = ", ".join(f"{k} {v / n * 1e3:.0f}" for k, v in spent.items())
        print(f"run {r + 1}: {s['seconds'] / n * 1e3:.0f} ms per step ({n} steps) = {parts} ms, and the rest")
    print(f"model={model} method={a.method} threads={a.threads} cpu capability={torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
