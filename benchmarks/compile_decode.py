"""Decoding speed of a model's KV-cached step, eager against `torch.compile` with a static cache
(benchmarks/HISTORY.md §10): milliseconds per generated token for a batch, and the compile time.

    python benchmarks/compile_decode.py --model runs/base-s1 [--batch 16] [--tokens 48] [--threads 1]
"""

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    from transformers import StaticCache

    from handrail.runtime.models import load_model

    torch.set_num_threads(a.threads)
    lm, _, _ = load_model(a.model)
    lm.eval()
    B, P, T = a.batch, a.prompt, a.tokens
    ids = torch.randint(5, 20, (B, P), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(B, P + T, dtype=torch.long)

    @torch.no_grad()
    def ms_per_token(forward, static: bool) -> float:
        cache = StaticCache(config=lm.config, max_cache_len=P + T) if static else None
        out = lm(input_ids=ids, attention_mask=attn if static else attn[:, :P],
                 position_ids=torch.arange(P)[None].expand(B, P), past_key_values=cache, use_cache=True,
                 cache_position=torch.arange(P) if static else None)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
        t0 = time.time()
        for t in range(T):
            pos = torch.tensor([P + t])
            kw = dict(attention_mask=attn, cache_position=pos) if static else dict(attention_mask=attn[:, :P + t + 1])
            out = forward(input_ids=tok[:, None], position_ids=pos[None].expand(B, 1), past_key_values=cache,
                          use_cache=True, **kw)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
        return (time.time() - t0) / T * 1000

    print(f"eager, dynamic cache: {ms_per_token(lm, False):.2f}, {ms_per_token(lm, False):.2f} ms/token")
    print(f"eager, static cache:  {ms_per_token(lm, True):.2f}, {ms_per_token(lm, True):.2f} ms/token")
    compiled = torch.compile(lm.forward, dynamic=False)
    t0 = time.time()
    ms_per_token(compiled, True)
    print(f"compile (first pass, this batch shape): {time.time() - t0:.1f} s")
    print(f"compiled, static cache: {ms_per_token(compiled, True):.2f}, {ms_per_token(compiled, True):.2f} ms/token "
          f"(B={B}, {a.threads} thread(s), {torch.backends.cpu.get_cpu_capability()})")


if __name__ == "__main__":
    main()
