"""How often a base writes two operations on one line (`37+5-8=34`) when sampling, and how often
those completions are right (BENCHMARKS.md §L12).

    python benchmarks/terse_share.py --model runs/terse-base1 [--n 100] [--samples 4]
"""

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=100, help="held-out problems of the default task and level")
    ap.add_argument("--samples", type=int, default=4, help="samples per problem at temperature 1")
    a = ap.parse_args()

    import torch

    from handrail.runtime.evaluate import prompt_ids
    from handrail.runtime.models import load_model, stop_ids
    from handrail.engine.rollout import sample
    from handrail.commands.sources import eval_records

    torch.set_num_threads(1)
    task, recs = eval_records(None, None, None, a.n)
    model, tok, tpl = load_model(a.model)
    rows = [r for r in recs for _ in range(a.samples)]
    out = sample(model, tok, prompt_ids(tok, rows, tpl), max_new_tokens=64, stop_ids=stop_ids(tok),
                 temperature=1.0, seed=0)
    terse = [any(line.count("+") + line.count("-") >= 2 for line in t.splitlines() if "=" in line) for t in out.texts]
    ok = [task.verify(t, r.answer) for t, r in zip(out.texts, rows)]
    n_terse = sum(terse)
    print(f"{len(rows)} samples: {n_terse / len(rows):.1%} have a two-operation line; of those "
          f"{sum(o for o, t in zip(ok, terse) if t) / max(1, n_terse):.1%} are right (all samples: {sum(ok) / len(rows):.1%}); "
          f"{torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
