"""A self-distillation step's parts on one real batch, as handrail runs them now and as it ran them
before the direct attention, the lean training forward and fused AdamW (benchmarks/HISTORY.md §11),
interleaved in one process.

    python benchmarks/step_parts.py [--model runs/base] [--rollouts 16] [--rounds 15] [--threads 2]

The batch is a real step's: the embedded task's training prompts, completions sampled from the
model, the teacher shown the reference. Each round times every part both ways (--reps calls
each, in alternating order) and the median over rounds is printed:

- sampling: 64 tokens at temperature 1, EOS stopping off (every row decodes every step);
- the teacher's pass (no gradient) and the divergence gate, `SelfDistill.score`;
- the student's forward with the loss, and backward, `SelfDistill.student_loss`;
- the optimizer's step.

"before" is sdpa for every attention (decoder.MATH_KEYS = 0), the model's own forward for the
student's training pass, and AdamW with foreach; "now" is this revision's defaults. How far the
two differ is printed too: the parts compute the same functions, to float rounding.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import handrail.engine.decoder as D
from handrail.runtime.cpu import keep_freed_memory
from handrail.runtime.evaluate import PromptIds
from handrail.methods import METHODS, World
from handrail.runtime.models import HiddenStates, load_model, stop_ids
from handrail.engine.rollout import sample
from handrail.commands.sources import default_base_model
from handrail.commands.train import TrainConfig, task_and_records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as train does
    model = a.model or str(default_base_model())
    cfg = TrainConfig(model=model)
    teacher, tok, tpl = load_model(model)
    teacher.eval()
    student = load_model(model)[0].train()
    policy = HiddenStates(student)
    task, records, _ = task_and_records(cfg)
    records = records[:a.rollouts]
    method = METHODS["self-distill"](cfg, teacher, tok, tpl, task, PromptIds(tok, tpl))
    params = list(student.parameters())
    optimizers = {"before": torch.optim.AdamW(params, lr=1e-9, foreach=True),
                  "now": torch.optim.AdamW(params, lr=1e-9, fused=True)}
    ids = method.prompts(records)
    rollout = sample(student, tok, ids, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids(tok),
                     temperature=1.0, seed=0)
    world = World()
    signal = method.score(records, rollout, teacher, world)

    checkpointing, math_keys = D.checkpointing, D.MATH_KEYS

    def use(way):
        D.MATH_KEYS = 0 if way == "before" else math_keys
        # the lean training forward steps aside where the model checkpoints: "before" says it does
        D.checkpointing = (lambda m: True) if way == "before" else checkpointing

    out = {}

    def parts(way):
        def sampling():
            out[way, "sampling"] = sample(student, tok, ids, max_new_tokens=cfg.max_new_tokens, stop_ids=[-1],
                                          temperature=1.0, seed=0).logprobs

        def score():
            out[way, "teacher pass"] = method.score(records, rollout, teacher, world).teacher[0]

        def student_pass():
            student.zero_grad(set_to_none=True)
            loss, _ = method.student_loss(policy, records, rollout, signal)
            loss.backward()
            out[way, "student forward + loss + backward"] = torch.cat([p.grad.flatten() for p in params])

        def optimizer():
            optimizers[way].step()

        return {"sampling": sampling, "teacher pass": score, "student forward + loss + backward": student_pass,
                "optimizer": optimizer}

    ways = {w: parts(w) for w in ("before", "now")}

    def timed(way, name):
        use(way)
        fn = ways[way][name]
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        return (time.perf_counter() - t) / a.reps

    names = list(ways["now"])
    for way in ways:  # warm-up, and gradients for the optimizer to apply
        for name in names:
            timed(way, name)
    times = {(w, n): [] for w in ways for n in names}
    for r in range(a.rounds):
        for name in names:
            for way in (("before", "now") if r % 2 == 0 else ("now", "before")):
                times[way, name].append(timed(way, name))
    use("now")
    print(f"a step's parts on {len(records)} rollouts, {a.reps} calls each, median of {a.rounds} interleaved rounds:")
    total = {"before": 0.0, "now": 0.0}
    for name in names:
        b, n = statistics.median(times["before", name]), statistics.median(times["now", name])
        total["before"] += b
        total["now"] += n
        ratio = statistics.median(x / y for x, y in zip(times["before", name], times["now", name]))
        diff = ""
        if ("now", name) in out:
            x, y = out["before", name], out["now", name]
            diff = f"; largest difference {(x - y).abs().max().item():.1e} (of values up to {y.abs().max().item():.1e})"
        print(f"  {name:36s} before {b * 1e3:6.1f} ms   now {n * 1e3:6.1f} ms   before/now {ratio:.2f}{diff}")
    print(f"  {'sum':36s} before {total['before'] * 1e3:6.1f} ms   now {total['now'] * 1e3:6.1f} ms   "
          f"before/now {total['before'] / total['now']:.2f}")
    print(f"model={model} threads={a.threads} cpu capability={torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
