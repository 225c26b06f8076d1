"""Tokens/s of handrail's batched KV-cached sampler against `model.generate` on the same batch.

    python benchmarks/rollout_speed.py [--model smollm2] [--batch 16] [--new 64]

Both sample (temperature 1) with EOS stopping disabled, so both produce exactly batch x new
tokens; the figure is the best of --repeat runs after one warm-up.
"""

import argparse
import time

import torch

from handrail.evaluate import prompt_ids
from handrail.models import load_model
from handrail.rollout import left_pad, sample
from handrail.run import default_base_model, eval_records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    model, tok, tpl = load_model(a.model or str(default_base_model()))
    _, recs = eval_records("chain", None, n=a.batch)
    ids = prompt_ids(tok, recs, tpl)
    x, attn = left_pad(ids, tok.pad_token_id)

    def ours():
        sample(model, tok, ids, max_new_tokens=a.new, stop_ids=[-1], temperature=1.0, seed=0)

    def hf():
        model.generate(input_ids=x, attention_mask=attn, max_new_tokens=a.new, min_new_tokens=a.new,
                       do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)

    for name, fn in (("handrail.rollout.sample", ours), ("transformers generate", hf)):
        fn()
        best = min(_time(fn) for _ in range(a.repeat))
        print(f"{name:24s} {a.batch * a.new / best:8.0f} tokens/s  ({best:.2f}s for {a.batch}x{a.new})")
    print(f"model={a.model or 'default tiny'} threads={torch.get_num_threads()}")


def _time(fn):
    t = time.time()
    with torch.no_grad():
        fn()
    return time.time() - t


if __name__ == "__main__":
    main()
