"""Where a training step's time goes: wall-clock timers around each part of the loop.

    python benchmarks/step_split.py [--model runs/base] [--method self-distill] [--rollouts 512] [--repeat 2]
    HANDRAIL_MALLOC=0 python benchmarks/step_split.py      # with glibc's default allocator settings

Each part (sampling, `score` (the teacher pass for self-distillation), the student's forward with
the loss, backward, the optimizer) is timed by wrapping the function the loop calls, for
--rollouts of the real loop with the lab's settings (16 completions a step, 64 tokens, 2 threads,
no evaluation). Timers, not a profiler: cProfile and torch.profiler add per-call costs that
inflate exactly the small operations being measured. Prints ms per step for each part, per repeat
(each repeat a fresh run in this process; the machine's speed drifts, so compare within a run),
and the process's minor page faults per step (what handrail/runtime/cpu.py's allocator setting removes).
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
import time

import torch

import handrail.commands.train as T
from handrail.runtime.cpu import keep_freed_memory
from handrail.methods import METHODS
from handrail.commands.sources import default_base_model


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
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with tempfile.TemporaryDirectory() as out:
            s = T.train(T.TrainConfig(model=model, out=out, method=a.method, rollouts=a.rollouts, max_new_tokens=64,
                                      eval_n=0, checkpoint_every=0, threads=a.threads), log=lambda *_: None)
        n = s["step"]
        parts = ", ".join(f"{k} {v / n * 1e3:.0f}" for k, v in spent.items())
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
        print(f"run {r + 1}: {s['seconds'] / n * 1e3:.0f} ms per step ({n} steps) = {parts} ms, and the rest; "
              f"{faults:.0f} page faults per step")
    print(f"model={model} method={a.method} threads={a.threads} cpu capability={torch.backends.cpu.get_cpu_capability()} "
          f"freed memory kept (handrail/runtime/cpu.py): {keep_freed_memory()}; a page fault costs {fault_cost() * 1e6:.1f} µs here")


def fault_cost(mib: int = 200) -> float:
    """Seconds per page fault: the time to touch every page of fresh anonymous memory, once."""
    import mmap

    n = mib << 20
    m = mmap.mmap(-1, n)
    page = mmap.PAGESIZE
    faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for i in range(0, n, page):
        m[i] = 1
    t, faults = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    m.close()
    return t / max(faults, 1)


if __name__ == "__main__":
    main()
