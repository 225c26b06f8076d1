"""Self-distillation on an embedded task, every aggregation rule, several seeds.

    python benchmarks/self_distill.py --hint solution --out benchmarks/results/self_distill_solution.json
    python benchmarks/self_distill.py --hint answer   --out benchmarks/results/impossible_knowledge.json

Trains from the same base model with each rule and seed at the same rollout budget, then prints
a markdown table of held-out greedy pass@1 and leak rate before and after (mean ± sd over
seeds) and the teacher's measured intervention. Every number comes from the run folders it
writes under --runs.
"""

import argparse
import json
import statistics
from pathlib import Path

from handrail.commands.sources import default_base_model
from handrail.commands.train import TrainConfig, train


def mean_sd(xs):
    return f"{statistics.mean(xs):.1%} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.1%}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="base model folder (default: the cached embedded default)")
    ap.add_argument("--task", default="chain")
    ap.add_argument("--hint", default="solution", choices=["solution", "answer"])
    ap.add_argument("--rules", default="trust-region,geometric,support,none")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rollouts", type=int, default=2048)
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value TrainConfig overrides for every run")
    a = ap.parse_args()
    base = a.base or str(default_base_model())
    results = []
    for rule in a.rules.split(","):
        for seed in map(int, a.seeds.split(",")):
            out = Path(a.runs) / f"{a.task}-{a.hint}-{rule}-s{seed}"
            kw = dict(model=base, out=str(out), task=a.task, rule=rule, hint=a.hint, seed=seed,
                      rollouts=a.rollouts, checkpoint_every=0)
            kw.update(dict(o.split("=", 1) for o in a.overrides))
            from handrail.config import build

            cfg = build(TrainConfig, overrides=kw)
            if out.exists():
                import shutil

                shutil.rmtree(out)
            train(cfg, log=lambda *_: None)
            rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
            evals = [r for r in rows if "eval/pass@1" in r]
            steps = [r for r in rows if "teacher/kl" in r]
            results.append({
                "rule": rule, "seed": seed, "before": evals[0]["eval/pass@1"], "after": evals[-1]["eval/pass@1"],
                "best": max(r["eval/pass@1"] for r in evals),
                "leak_before": evals[0]["eval/leak_rate"], "leak_after": evals[-1]["eval/leak_rate"],
                "teacher_kl": statistics.mean(r["teacher/kl"] for r in steps),
                "raw_kl": statistics.mean(r["teacher/raw_kl"] for r in steps),
                "intervened": statistics.mean(r["teacher/intervened"] for r in steps),
                "seconds": rows[-1]["seconds"], "curve": [(r["rollouts"], r["eval/pass@1"]) for r in evals],
            })
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "base": base, "runs": results}, indent=2))
    print("\n| rule | pass@1 before | pass@1 after | leak before | leak after | KL(q‖p_S)/tok | KL(p_T‖p_S)/tok | intervened | s/run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rule in a.rules.split(","):
        rs = [r for r in results if r["rule"] == rule]
        print(f"| {rule} | {mean_sd([r['before'] for r in rs])} | {mean_sd([r['after'] for r in rs])} | "
              f"{mean_sd([r['leak_before'] for r in rs])} | {mean_sd([r['leak_after'] for r in rs])} | "
              f"{statistics.mean(r['teacher_kl'] for r in rs):.3f} | {statistics.mean(r['raw_kl'] for r in rs):.3f} | "
              f"{statistics.mean(r['intervened'] for r in rs):.0%} | {statistics.mean(r['seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
