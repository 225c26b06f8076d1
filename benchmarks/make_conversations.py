"""Logged conversations made from a model's own wrong first attempts, for `rollout=logged` runs.

    python benchmarks/make_conversations.py --model MODEL (--task chain | --data train.jsonl) --n 512 --out DIR

For each problem the model's own first attempt is sampled (as a user's chat would have it); the
attempts the verifier rejects (leniently: the answer where a reader finds it) become a
conversation: the problem, the wrong attempt, a user turn saying it is wrong (and what the
attempt answered; never the right answer), and the reference solution as the accepted reply:

    {"messages": [{"role": "user", "content": "37+5-8+6"},
                  {"role": "assistant", "content": "37+5=42\\n42-8=46\\n46+6=52\\n#### 52"},
                  {"role": "user", "content": "52 is not right. Check each step and solve it again."},
                  {"role": "assistant", "content": "37+5=42\\n42-8=34\\n34+6=40\\n#### 40", "accepted": true}],
     "answer": "40"}

With `--task`, `test.jsonl` holds the task's held-out test problems (for `--eval-data`).

Two files over the same problems, so that three ways to learn from them compare on equal data:
`conversations.jsonl` (train with `rollout=logged`: nothing is sampled) and `problems.jsonl`
(prompt, the accepted reply as the solution, answer: SFT on the accepted replies, or on-policy
self-distillation, which samples attempts of its own).
"""

import argparse
import json
from pathlib import Path

from handrail.data.answers import reader_answer
from handrail.data.records import reference_answer
from handrail.runtime.evaluate import is_correct, prompt_ids
from handrail.runtime.models import load_model, stop_ids
from handrail.engine.rollout import sample
from handrail.commands.sources import eval_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--task", help="embedded task (training problems of its post-training level)")
    src.add_argument("--data", help="JSONL of records with a solution")
    ap.add_argument("--n", type=int, default=512, help="problems to attempt")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", type=int, default=200,
                    help="with --task: also write this many of its held-out test problems as test.jsonl")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, tok, tpl = load_model(a.model)
    if a.data:
        task, records = eval_records(None, a.data, None, a.n)
    else:
        from handrail.data.records import records_from_task
        from handrail.data.tasks import get_task

        task = get_task(a.task or "chain")
        records = records_from_task(task.split("train", a.n, task.post_level, seed=1000 + a.seed))
    records = [r for r in records if r.solution]
    attempts = sample(model, tok, prompt_ids(tok, records, tpl), max_new_tokens=a.max_new_tokens,
                      stop_ids=stop_ids(tok), temperature=1.0, seed=a.seed).texts
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = 0
    with open(out / "conversations.jsonl", "w") as conv, open(out / "problems.jsonl", "w") as plain:
        for rec, attempt in zip(records, attempts):
            if is_correct(attempt, rec, task, lenient=True) or not attempt.strip():
                continue
            said = reader_answer(attempt)
            feedback = (f"{said} is not right." if said else "That does not answer it.") + \
                " Check each step and solve it again."
            answer = reference_answer(rec)
            conv.write(json.dumps({"messages": [
                {"role": "user", "content": rec.text}, {"role": "assistant", "content": attempt},
                {"role": "user", "content": feedback},
                {"role": "assistant", "content": rec.solution, "accepted": True}], "answer": answer}) + "\n")
            plain.write(json.dumps({"prompt": rec.text, "solution": rec.solution, "answer": answer}) + "\n")
            kept += 1
    if not a.data and a.test:  # the task's held-out problems as a file, so every run is evaluated on them
        with open(out / "test.jsonl", "w") as f:
            for rec in records_from_task(task.split("test", a.test, task.post_level)):
                f.write(json.dumps({"prompt": rec.text, "solution": rec.solution, "answer": reference_answer(rec)}) + "\n")
    print(f"{kept} of {len(records)} first attempts were wrong: {out}/conversations.jsonl, problems.jsonl")


if __name__ == "__main__":
    main()
