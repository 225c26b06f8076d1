"""Does the privileged teacher work from the student's path, or copy the reference?

    python benchmarks/teacher_probe.py MODEL [MODEL ...]

For each held-out problem, a slip is put into one step of the worked solution (as a student
might make), and the teacher, shown the full reference as its hint, continues greedily from the
slipped prefix. Its next line is classified as *consistent* (the correct next step computed from
the slipped value), *reference result* (whatever the operands, the result is the reference's
next result, which the student's work does not justify), or *other* (e.g. its own arithmetic
slip). Self-distillation assumes a mostly consistent teacher.
"""

import json
import random
import sys
from pathlib import Path

from handrail.data.records import teacher_prompt
from handrail.runtime.models import load_model, stop_ids
from handrail.engine.rollout import sample
from handrail.commands.sources import eval_records


def probe(model_path: str, n: int = 200, seed: int = 0) -> dict:
    model, tok, tpl = load_model(model_path)
    meta = Path(model_path) / "handrail.json"
    task_name = (json.loads(meta.read_text()).get("task") if meta.exists() else None) or "chain"
    task, recs = eval_records(task_name, None, n=n)
    rng = random.Random(seed)
    prompts, expected, copied = [], [], []
    for rec in recs:
        prefix, continuation = task.detour(rec.solution, rng)
        ref_lines = rec.solution.splitlines()
        k = prefix.count("\n")  # lines given, the slip being the last
        prompts.append(tok(teacher_prompt(tok, rec, tpl) + prefix, add_special_tokens=False)["input_ids"])
        expected.append(continuation.splitlines()[0])
        copied.append(ref_lines[k])
    out = sample(model, tok, prompts, max_new_tokens=16, stop_ids=stop_ids(tok), temperature=0)
    firsts = [t.splitlines()[0] if t else "" for t in out.texts]
    def result(line):
        return line.rsplit("=", 1)[-1].replace("####", "").strip()

    cons = sum(f == e for f, e in zip(firsts, expected)) / n
    copy = sum(f != e and result(f) == result(c) for f, e, c in zip(firsts, expected, copied)) / n
    return {"model": model_path, "consistent": cons, "copies_reference": copy, "other": 1 - cons - copy, "n": n}


if __name__ == "__main__":
    for m in sys.argv[1:]:
        r = probe(m)
        print(f"{r['model']}: consistent {r['consistent']:.1%} | reference result {r['copies_reference']:.1%} | "
              f"other {r['other']:.1%} (n={r['n']})", flush=True)
