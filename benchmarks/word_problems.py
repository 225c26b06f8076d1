"""Word problems for a small pretrained instruct model (the pretrained-model lab: BENCHMARKS.md),
written as a user's JSONL records.

    python benchmarks/word_problems.py --out /tmp/wp      # train, val, test and warmup .jsonl

A person starts with some things and gains or loses a few, `--steps` times:

    Ivy has 62 stickers. She gets 6 more, then gives 9 away. How many stickers does Ivy have now?

worked one step per line in plain English, closing with the GSM8K answer mark:

    Ivy starts with 62 stickers.
    She gets 6 more: 62 + 6 = 68.
    She gives 9 away: 68 - 9 = 59.
    #### 59

The four files hold disjoint problems: `train.jsonl` (prompt, solution, answer) for training,
`val.jsonl` for choosing hyperparameters, `test.jsonl` held out, and `warmup.jsonl` for a short
supervised warm start that teaches the format before post-training (by default one-step problems
only, so the warm start shows the form of the work, not the multi-step problems post-training is
about; `--warmup-steps 1,1,1,2` shows a quarter of them two-step, for a student that already
solves some).
"""

import argparse
import json
import random
from pathlib import Path

PEOPLE = [("Ivy", "She"), ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Ana", "She"), ("Leo", "He"),
          ("Zoe", "She"), ("Max", "He"), ("Eva", "She"), ("Ben", "He"), ("Lily", "She"), ("Omar", "He"),
          ("Nina", "She"), ("Raj", "He"), ("Kim", "She"), ("Hugo", "He")]
THINGS = ["stickers", "apples", "marbles", "cards", "books", "coins", "shells", "pens", "stamps", "beads"]
GAIN = ["gets {b} more", "buys {b} more", "finds {b} more"]
LOSE = ["gives {b} away", "loses {b}", "uses {b}"]


def problem(rng: random.Random, steps: int) -> dict:
    name, pronoun = rng.choice(PEOPLE)
    thing = rng.choice(THINGS)
    value = rng.randint(12, 89)
    start, events, lines = value, [], [f"{name} starts with {value} {thing}."]
    for _ in range(steps):
        b = rng.randint(2, 9)
        gain = rng.random() < 0.5 if value - b >= 0 else True
        phrase = rng.choice(GAIN if gain else LOSE).format(b=b)
        new = value + b if gain else value - b
        events.append(phrase)
        lines.append(f"{pronoun} {phrase}: {value} {'+' if gain else '-'} {b} = {new}.")
        value = new
    story = events[0] if steps == 1 else ", then ".join([", ".join(events[:-1]), events[-1]])
    prompt = f"{name} has {start} {thing}. {pronoun} {story}. How many {thing} does {name} have now?"
    return {"prompt": prompt, "solution": "\n".join(lines + [f"#### {value}"]), "answer": str(value)}


def draw(rng: random.Random, n: int, steps: list[int], seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        rec = problem(rng, rng.choice(steps))
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            out.append(rec)
    return out


def step_list(text: str) -> list[int]:
    """'1,1,1,2' -> [1, 1, 1, 2]; problems draw their step count uniformly from it."""
    try:
        out = [int(s) for s in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want positive integers separated by commas, e.g. 2 or 1,1,1,2")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=step_list, default="2", help="steps per problem, e.g. 2 or 1,2,3")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--warmup-steps", type=step_list, default="1",
                    help="steps per warmup problem, drawn uniformly from the list: 1,1,1,2 makes a quarter two-step")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng, seen = random.Random(a.seed), set()
    # test first, so that its problems do not depend on how many training problems are asked for
    for name, n, st in (("test", a.test, a.steps), ("val", a.val, a.steps), ("train", a.train, a.steps),
                        ("warmup", a.warmup, a.warmup_steps)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in draw(rng, n, st, seen))
    print(f"wrote {out}/test.jsonl, val.jsonl, train.jsonl, warmup.jsonl (steps {a.steps}, warmup {a.warmup_steps})")


if __name__ == "__main__":
    main()
