"""Peak memory of the distillation loss, chunked over the sequence vs naive, at SmolLM2's
vocabulary (49,152) and width (576), with 1,024-token completions.

    python benchmarks/loss_memory.py [--batch 2] [--tokens 1024] [--rule trust-region]

Each variant runs in a fresh subprocess; the figure is the growth of peak resident memory
(ru_maxrss) during forward + backward of the loss, over what the inputs already hold.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def child(mode: str, B: int, T: int, rule: str) -> dict:
    import torch

    from handrail.objectives import chunked_sum, distill_chunk, naive_sum
    from handrail.targets import make_rule

    torch.manual_seed(0)
    H, V = 576, 49152
    head, head_T = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, requires_grad=True)
    hidden_T, mask = torch.randn(B, T, H), torch.ones(B, T)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    fn = distill_chunk(make_rule(rule))
    summer = chunked_sum if mode == "chunked" else naive_sum
    out = summer(fn, hidden, head, mask, None, chunk_size=128, refs=((hidden_T, head_T), None))
    out[0].backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "extra_peak_MiB": round((peak - base) / 1024), "seconds": round(time.time() - t, 2),
            "loss": round(out[0].item(), 3), "one_BxTxV_fp32_MiB": round(B * T * V * 4 / 2**20)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rule", default="trust-region")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.tokens, a.rule)))
        return
    for mode in ("chunked", "naive"):
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(a.batch), "--tokens",
                            str(a.tokens), "--rule", a.rule], capture_output=True, text=True)
        print(p.stdout.strip() or p.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
