"""The teacher's pass (no gradient, [P_T, g] -> hidden states at g) by the model's own forward and
by decoder.hidden_states, interleaved in one process on the same batch.

    python benchmarks/teacher_pass.py [--model runs/base] [--rollouts 16] [--rounds 15] [--threads 2]

The batch is a real self-distillation step's: the embedded task's training prompts, with the
reference shown, and completions sampled from the model. Each round times both ways (10 passes
each) and the median over rounds is printed, with the largest difference between the two's hidden
states (float rounding: the lean pass computes short sequences' attention directly, decoder.MATH_KEYS).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import handrail.engine.decoder as D
from handrail.runtime.cpu import keep_freed_memory
from handrail.runtime.evaluate import prompt_ids
from handrail.methods import completion_hidden
from handrail.runtime.models import HiddenStates, load_model, stop_ids
from handrail.engine.rollout import sample
from handrail.commands.sources import default_base_model
from handrail.commands.train import TrainConfig, task_and_records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as train does
    model = a.model or str(default_base_model())
    lm, tok, tpl = load_model(model)
    lm.eval()
    records = task_and_records(TrainConfig(model=model))[1][:a.rollouts]
    rollout = sample(lm, tok, prompt_ids(tok, records, tpl), max_new_tokens=64, stop_ids=stop_ids(tok),
                     temperature=1.0, seed=0)
    teacher = prompt_ids(tok, records, tpl, hint="solution")

    def teacher_pass():
        with torch.no_grad():
            return completion_hidden(HiddenStates(lm), teacher, rollout, tok.pad_token_id)

    def timed(lean: bool) -> float:
        D.LEAN = lean
        t = time.perf_counter()
        for _ in range(10):
            teacher_pass()
        return (time.perf_counter() - t) / 10

    D.LEAN = False
    ref = teacher_pass()
    D.LEAN = True
    diff = (teacher_pass() - ref).abs().max().item()
    timed(False), timed(True)  # warm-up
    forward, lean = [], []
    for _ in range(a.rounds):
        forward.append(timed(False))
        lean.append(timed(True))
    f, l = statistics.median(forward), statistics.median(lean)
    print(f"teacher pass on {rollout.completion_ids.shape[0]} rows x {max(map(len, teacher)) + rollout.completion_ids.shape[1]} "
          f"columns: model forward {f * 1e3:.1f} ms, decoder.hidden_states {l * 1e3:.1f} ms (median of {a.rounds} "
          f"interleaved rounds; forward/lean {statistics.median(x / y for x, y in zip(forward, lean)):.2f}); "
          f"largest difference in hidden states: {diff:.1e}")
    print(f"model={model} threads={a.threads} cpu capability={torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
