"""A task that is not one of the embedded ones, written as a user would write JSONL records, to
try the lab on user data (`pretrain --data`, `train --data`, `compare --data`).

    python benchmarks/user_task.py --out /tmp/ut      # writes train.jsonl, test.jsonl, val.jsonl, answers.jsonl

Two kinds. `--kind digits` (the default): the sum of a number's digits, the number alone as the
prompt, worked one addition per line:

    48291
    4+8=12
    12+2=14
    14+9=23
    23+1=24
    #### 24

`--kind products`: sums of products, `7*3+4*6+2*5`, worked one product per line and then the additions:

    7*3=21
    4*6=24
    2*5=10
    21+24=45
    45+10=55
    #### 55

`train.jsonl` has prompt, solution and answer; `answers.jsonl` the same problems with the answer
only; `test.jsonl` held-out problems (disjoint prompts); `val.jsonl` validation problems for
choosing hyperparameters (`compare ... sweep=... val_data=val.jsonl`), disjoint from both.
"""

import argparse
import json
import random
from pathlib import Path


def digits(rng: random.Random, n: int) -> dict:
    ds = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(n - 1)]
    lines, acc = [], ds[0]
    for d in ds[1:]:
        lines.append(f"{acc}+{d}={acc + d}")
        acc += d
    return {"prompt": "".join(map(str, ds)), "solution": "\n".join(lines + [f"#### {acc}"]), "answer": str(acc)}


def products(rng: random.Random, terms: int) -> dict:
    pairs = [(rng.randint(2, 9), rng.randint(2, 9)) for _ in range(terms)]
    products = [a * b for a, b in pairs]
    lines = [f"{a}*{b}={a * b}" for a, b in pairs]
    acc = products[0]
    for p in products[1:]:
        lines.append(f"{acc}+{p}={acc + p}")
        acc += p
    prompt = "+".join(f"{a}*{b}" for a, b in pairs)
    return {"prompt": prompt, "solution": "\n".join(lines + [f"#### {acc}"]), "answer": str(acc)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--kind", choices=("digits", "products"), default="digits")
    ap.add_argument("--terms", type=int, default=None,
                    help="the test length: digits (default 6) or products (default 3); training draws "
                         "lengths from 3 digits (1 product) up to it")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    problem = digits if a.kind == "digits" else products
    longest = a.terms or (6 if a.kind == "digits" else 3)
    lengths = range(3, longest + 1) if a.kind == "digits" else range(1, longest + 1)
    test, seen = [], set()
    while len(test) < a.test:
        p = problem(rng, longest)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            test.append(p)
    train = []
    while len(train) < a.train:
        p = problem(rng, rng.choice(lengths))
        if p["prompt"] not in seen:
            train.append(p)
    seen |= {p["prompt"] for p in train}
    val = []
    while len(val) < a.test:
        p = problem(rng, longest)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            val.append(p)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test), ("val", val),
                       ("answers", [{"prompt": r["prompt"], "answer": r["answer"]} for r in train])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} training, {len(test)} test and {len(val)} validation problems to {out}")


if __name__ == "__main__":
    main()
