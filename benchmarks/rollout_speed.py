"""Tokens/s of handrail's batched KV-cached sampler against `model.generate` on the same batch,
with its lean decoding step (handrail/engine/decoder.py) and with the model's own forward per token.

    python benchmarks/rollout_speed.py [--model smollm2] [--batch 16] [--new 64] [--repeat 5]

All three sample (temperature 1) with EOS stopping disabled, so each produces exactly
batch x new tokens. The runs are interleaved (one of each, --repeat times, after a warm-up), so
the machine's drift touches all three alike; the median is printed. The two handrail rows draw
the same noise, so their completions and log-probs are compared too: the lean step computes short
sequences' attention directly (decoder.MATH_KEYS), so its logits are the forward's to float
rounding, and a sample may then differ where two tokens' noisy scores nearly tie.
"""

import argparse
import statistics
import time

import torch

import handrail.engine.rollout as rollout
from handrail.engine.decoder import supported
from handrail.runtime.evaluate import prompt_ids
from handrail.runtime.models import load_model
from handrail.engine.rollout import left_pad, sample
from handrail.commands.sources import default_base_model, eval_records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="default: the embedded default base model (built if missing)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, tpl = load_model(a.model or str(default_base_model()))
    _, recs = eval_records("chain", None, n=a.batch)
    ids = prompt_ids(tok, recs, tpl)
    x, attn = left_pad(ids, tok.pad_token_id)
    outs = {}

    def ours(lean):
        def run():
            rollout.decoder.LEAN = lean
            outs[lean] = sample(model, tok, ids, max_new_tokens=a.new, stop_ids=[-1], temperature=1.0, seed=0)
        return run

    def hf():
        model.generate(input_ids=x, attention_mask=attn, max_new_tokens=a.new, min_new_tokens=a.new,
                       do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)

    runs = {"handrail sample, lean step": ours(True), "handrail sample, model forward": ours(False),
            "transformers generate": hf}
    times = {name: [] for name in runs}
    for fn in runs.values():
        _time(fn)  # warm-up
    for _ in range(a.repeat):
        for name, fn in runs.items():
            times[name].append(_time(fn))
    for name, ts in times.items():
        best = statistics.median(ts)
        print(f"{name:32s} {a.batch * a.new / best:8.0f} tokens/s  ({best * 1e3 / a.new:.2f} ms per token column, "
              f"median of {a.repeat}: {', '.join(f'{t:.2f}' for t in ts)} s)")
    same = torch.equal(outs[True].completion_ids, outs[False].completion_ids) and \
        torch.equal(outs[True].logprobs, outs[False].logprobs)
    print(f"lean step used: {supported(model)}; lean and forward samples identical: {same}")
    print(f"model={a.model or 'default tiny'} threads={torch.get_num_threads()} "
          f"cpu capability={torch.backends.cpu.get_cpu_capability()}")


def _time(fn):
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
