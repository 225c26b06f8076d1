"""Peak memory and time of the distillation loss at SmolLM2's vocabulary (49,152) and width
(576), with 1,024-token completions: naive (one piece), chunked under activation checkpointing
(each chunk recomputed in backward), and fused (the gradient p_S - q taken in forward, chunk by
chunk; what training uses for a plain linear head), and fused with a top-k teacher (`--topk K`:
the teacher's K most likely tokens plus a tail bucket, `teacher_topk` in training).

    python benchmarks/loss_memory.py [--batch 2] [--tokens 1024] [--rule trust-region] [--topk 64]

Each variant runs in a fresh subprocess; the figure is the growth of peak resident memory
(ru_maxrss) during forward + backward of the loss, over what the inputs already hold.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def child(mode: str, B: int, T: int, rule: str, topk: int = 0) -> dict:
    import torch

    from handrail.engine.objectives import chunked_sum, distill_chunk, fused_distill_sum, naive_sum
    from handrail.engine.targets import make_rule

    torch.manual_seed(0)
    H, V = 576, 49152
    head, head_T = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, requires_grad=True)
    hidden_T, mask = torch.randn(B, T, H), torch.ones(B, T)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.time()
    refs = ((hidden_T, head_T), None, None)
    if mode in ("fused", "fused-topk"):
        out = fused_distill_sum(make_rule(rule), hidden, head, mask, None, refs=refs, chunk_size=128,
                                topk=topk if mode == "fused-topk" else 0)
    else:
        summer = chunked_sum if mode == "chunked" else naive_sum
        out = summer(distill_chunk(make_rule(rule)), hidden, head, mask, None, chunk_size=128, refs=refs)
    out[0].backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode + (f" (K={topk})" if mode == "fused-topk" else ""), "extra_peak_MiB": round((peak - base) / 1024), "seconds": round(time.time() - t, 2),
            "loss": round(out[0].item(), 3), "one_BxTxV_fp32_MiB": round(B * T * V * 4 / 2**20)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rule", default="trust-region")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant, interleaved")
    ap.add_argument("--topk", type=int, default=0, help="also run the fused loss with a top-k teacher of K tokens")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.tokens, a.rule, a.topk)))
        return
    for _ in range(a.repeat):
        for mode in ("naive", "chunked", "fused") + (("fused-topk",) if a.topk else ()):
            p = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(a.batch), "--tokens",
                                str(a.tokens), "--rule", a.rule, "--topk", str(a.topk)], capture_output=True, text=True)
            print(p.stdout.strip() or p.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
