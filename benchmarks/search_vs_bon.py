"""Step-level pUCT search against best-of-N sampling at an equal number of generated tokens.

    python benchmarks/search_vs_bon.py --model MODEL [--level L] [--n 200] [--seeds 3] [--out DIR]

Both use the task's program check (`--value check`: every step valid and the answer stated, no
reference answer) and stop a problem at its first completion that passes it; best-of-N otherwise
answers by majority vote. For each search setting (simulations per move) the script prints its
accuracy and generated tokens per problem, and best-of-N's accuracy at the same tokens,
interpolated (linearly in log tokens) between the two best-of-N budgets around it. Also the
share of sampled first steps that are valid: with none, there is nothing to search over.
Mean ± population sd over sampling seeds. Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the curve `points` [(tokens, accuracy)], linear in log tokens; None outside it."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y1
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def first_step_valid(model, tok, templates, records, task, samples: int = 8) -> float:
    from handrail.runtime.evaluate import prompt_ids
    from handrail.runtime.models import stop_ids
    from handrail.engine.rollout import sample
    from handrail.engine.steps import delimiter_ids

    stops = sorted(set(stop_ids(tok)) | set(delimiter_ids(tok)))
    ids = [p for p in prompt_ids(tok, records, templates) for _ in range(samples)]
    out = sample(model, tok, ids, max_new_tokens=64, stop_ids=stops, temperature=1.0, seed=0)
    recs = [r for r in records for _ in range(samples)]
    return statistics.mean(task.step_valid(r.text, [], t) for r, t in zip(recs, out.texts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="chain")
    ap.add_argument("--level", type=int)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--simulations", default="2,4,8,16")
    ap.add_argument("--best-of", default="1,2,4,8,16,32,64")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/search-vs-bon")
    a = ap.parse_args()

    import torch

    from handrail.runtime.models import load_model
    from handrail.commands.sources import environment, eval_records
    from handrail.methods.search import SearchConfig, search

    torch.set_num_threads(a.threads)
    task, records = eval_records(a.task, None, a.level, a.n)
    model, tok, templates = load_model(a.model)
    res = {"model": a.model, "task": a.task, "level": a.level or task.post_level, "n": len(records),
           "candidates": a.candidates, "cpu": platform.processor() or platform.machine(),
           "instruction_set": torch.backends.cpu.get_cpu_capability(),
           "first_step_valid": first_step_valid(model, tok, templates, records, task),
           "search": {}, "best_of": {}}
    print(f"level {res['level']}: sampled first steps valid {res['first_step_valid']:.1%}", flush=True)
    for kind, values in (("best_of", a.best_of), ("search", a.simulations)):
        for v in map(int, values.split(",")):
            runs = []
            for seed in range(a.seeds):
                t0 = time.time()
                cfg = SearchConfig(simulations=v, candidates=a.candidates)
                summary, _ = search(model, tok, templates, records, task, cfg,
                                    best_of=v if kind == "best_of" else 0, seed=seed)
                runs.append({"seed": seed, "accuracy": summary["accuracy"],
                             "tokens_per_problem": summary["tokens_per_problem"], "seconds": round(time.time() - t0, 1)})
            acc = [r["accuracy"] for r in runs]
            tokens = statistics.mean(r["tokens_per_problem"] for r in runs)
            res[kind][v] = {"runs": runs, "accuracy": statistics.mean(acc), "sd": statistics.pstdev(acc),
                            "tokens_per_problem": tokens}
            print(f"{kind} {v}: accuracy {statistics.mean(acc):.1%} ± {statistics.pstdev(acc):.1%}, "
                  f"{tokens:.0f} tokens/problem", flush=True)
    curve = [(r["tokens_per_problem"], r["accuracy"]) for r in res["best_of"].values()]
    print("\n| search (simulations/move) | tokens/problem | search accuracy | best-of-N at equal tokens |")
    print("|---|---|---|---|")
    for v, r in res["search"].items():
        bon = interpolate(curve, r["tokens_per_problem"])
        r["best_of_at_equal_tokens"] = bon
        print(f"| {v} | {r['tokens_per_problem']:.0f} | {r['accuracy']:.1%} ± {r['sd']:.1%} | "
              f"{'outside the best-of-N range' if bon is None else f'{bon:.1%}'} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res["environment"] = environment(a.model)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(f"\nwritten: {out / 'results.json'} (threads={a.threads}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
