"""The lean decoding step under `torch.no_grad` and under `torch.inference_mode` (what sampling uses).

    python benchmarks/decode_modes.py [--model runs/base] [--batch 16] [--repeat 12]

Both modes run the same kernels, so the logits are compared and must be identical; what differs
is the bookkeeping per call (inference mode keeps no version counters and records no views), which
matters where a step is many small calls: a small model's. Each repeat encodes a fresh batch of
lab prompts and times 45 one-token steps in each mode, alternating, after the process's
allocator setting (handrail/runtime/cpu.py) as in training. Prints the median microseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from handrail.runtime.cpu import keep_freed_memory
from handrail.engine.decoder import LeanDecoder, supported
from handrail.runtime.evaluate import prompt_ids
from handrail.runtime.models import load_model
from handrail.engine.rollout import left_pad
from handrail.commands.sources import default_base_model, eval_records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    model, tok, templates = load_model(a.model or str(default_base_model()))
    if not supported(model):
        raise SystemExit(f"decode_modes: the lean step does not take {type(model).__name__}")
    _, recs = eval_records("chain", None, n=a.batch)
    ids, attn = left_pad(prompt_ids(tok, recs, templates), tok.pad_token_id)
    feed = torch.randint(3, model.config.vocab_size, (a.steps + 3, a.batch), generator=torch.Generator().manual_seed(0))

    def run():
        d = LeanDecoder(model, ids, attn, a.steps + 3)
        out = [d.step(feed[i]) for i in range(3)]
        t = time.perf_counter()
        out += [d.step(feed[i]) for i in range(3, a.steps + 3)]
        return (time.perf_counter() - t) / a.steps * 1e6, torch.stack(out).clone()

    times, logits = {"no_grad": [], "inference_mode": []}, {}
    for _ in range(a.repeat):
        for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            with ctx():
                us, logits[mode] = run()
            times[mode].append(us)
    for mode, v in times.items():
        print(f"{mode:15s} {statistics.median(v):6.0f} µs per one-token step (median of {a.repeat}; "
              f"{', '.join(f'{x:.0f}' for x in v)})")
    print(f"logits identical: {torch.equal(logits['no_grad'], logits['inference_mode'])}; batch {a.batch}, "
          f"threads {a.threads}, cpu capability {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
