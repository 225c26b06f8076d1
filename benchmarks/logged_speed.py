"""Training throughput from logged conversations (no generation) against on-policy
self-distillation (sample, then train) on the same model, prompts and batch size.

    python benchmarks/logged_speed.py [--model smollm2] [--steps 6] [--batch 8] [--new 64]

The conversations are written from the model itself, so both modes train on text of the same
kind and length: for each problem the model's own sampled attempt is the first assistant turn,
the user asks again, and the reference solution is the accepted turn. The logged run trains on
both assistant turns (one record each); the on-policy run samples one completion per prompt.
Figures are trained completion tokens per second of training time over steps 2..N (evaluation
and the first step's warm-up excluded), from each run's metrics.jsonl.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from handrail.data.records import records_from_task
from handrail.runtime.evaluate import prompt_ids
from handrail.runtime.models import load_model, stop_ids
from handrail.engine.rollout import sample
from handrail.commands.sources import default_base_model
from handrail.data.tasks import get_task
from handrail.commands.train import TrainConfig, train


def write_conversations(model_spec, path: Path, n: int, new: int) -> Path:
    model, tok, tpl = load_model(model_spec)
    task = get_task("chain")
    recs = records_from_task(task.split("train", n, task.post_level, seed=11))
    attempts = sample(model, tok, prompt_ids(tok, recs, tpl), max_new_tokens=new, stop_ids=stop_ids(tok),
                      temperature=1.0, seed=0).texts
    with open(path, "w") as f:
        for r, attempt in zip(recs, attempts):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": r.text},
                {"role": "assistant", "content": attempt},
                {"role": "user", "content": "Please check each step and try again."},
                {"role": "assistant", "content": r.solution, "accepted": True}], "answer": r.answer}) + "\n")
    return path


def run(cfg: TrainConfig) -> dict:
    """Trained tokens per second over steps 2..N (step 1 pays one-off warm-up costs)."""
    train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in open(Path(cfg.out) / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    tokens, seconds = last["tokens"] - first["tokens"], last["seconds"] - first["seconds"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--new", type=int, default=64, help="max new tokens (on-policy and the logged attempts)")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first step is not timed)")
    model = a.model or str(default_base_model())
    tmp = Path(tempfile.mkdtemp(prefix="logged-speed-"))
    data = write_conversations(model, tmp / "conversations.jsonl", a.steps * a.batch, a.new)
    common = dict(model=model, rollouts=a.steps * a.batch, prompts_per_step=a.batch, max_new_tokens=a.new,
                  eval_every=0, eval_n=0, checkpoint_every=0, lr=1e-5)
    logged = run(TrainConfig(out=str(tmp / "logged"), data=str(data), **common))
    online = run(TrainConfig(out=str(tmp / "on-policy"), task="chain", **common))
    for name, r in (("logged conversations", logged), ("on-policy self-distill", online)):
        print(f"{name:24s} {r['tokens_per_s']:8.0f} trained tokens/s  ({r['tokens']} tokens in {r['seconds']:.1f}s)")
    print(f"speed-up {logged['tokens_per_s'] / online['tokens_per_s']:.1f}x | model={a.model or 'default tiny'} "
          f"steps={a.steps} batch={a.batch} new={a.new} threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
