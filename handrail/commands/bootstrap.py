"""Answer-only records: make worked solutions first, then train on them (docs/method.md §3).

A record with only a final answer gives the teacher little to go on (and an answer-only hint
invites the model to state the answer before the work: the "impossible knowledge" case). The
bootstrap stage samples `k` completions per answer-only problem, from the student alone or
guided by the teacher shown the answer, and keeps the first one whose answer verifies and that
works before answering. Kept completions become the records' solutions; problems with none stay
out of training. Every completion sampled here counts in the run's rollout budget.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path


from handrail.data.records import Record
from handrail.data.datafile import facts
from handrail.runtime.evaluate import is_correct, is_leak, prompt_ids
from handrail.runtime.models import stop_ids
from handrail.engine.rollout import Guide, sample
from handrail.folders import progress

FILE = "bootstrap.jsonl"  # in the run folder: the solutions kept, one record per line


def needs_bootstrap(records) -> list[Record]:
    if not facts(records).answer_only:  # a file's index knows: its records are not all read to find none
        return []
    return [r for r in records if not r.solution]


def bootstrap(lm, tokenizer, templates, records: list[Record], task, cfg, acc, log=print) -> tuple[list[Record], dict]:
    """Returns (records with a verified solution, stats). Samples `cfg.bootstrap_k` completions for
    each of as many answer-only problems as `cfg.bootstrap_rollouts` pays for, in batches of
    `cfg.prompts_per_step` problems; each process samples its slice of every batch."""
    from accelerate.utils import gather_object

    pending = needs_bootstrap(records)
    random.Random(f"{cfg.seed}/bootstrap").shuffle(pending)
    k, per_batch = cfg.bootstrap_k, cfg.prompts_per_step
    pending = pending[:cfg.bootstrap_rollouts // k]
    stops, kept, used = stop_ids(tokenizer), {}, 0
    bar = progress(len(pending) * k, "bootstrap", "sample", show=acc.is_main_process)
    was_training = lm.training
    lm.eval()
    for b, start in enumerate(range(0, len(pending), per_batch)):
        problems = pending[start:start + per_batch]
        rows = [r for r in problems for _ in range(k)]
        per = -(-len(rows) // acc.num_processes)
        mine = slice(acc.process_index * per, (acc.process_index + 1) * per)
        local = rows[mine]
        texts = []
        if local:
            guide = None
            if cfg.bootstrap_rollout == "guided":  # the teacher sees the answer, the student does not
                guide = Guide(lm, prompt_ids(tokenizer, local, templates, hint="answer"), cfg.aggregation_rule())
            texts = sample(lm, tokenizer, prompt_ids(tokenizer, local, templates), max_new_tokens=cfg.max_new_tokens,
                           stop_ids=stops, temperature=cfg.temperature, top_p=cfg.top_p,
                           seed=cfg.seed * 100_003 + 50_000 + b, row_offset=mine.start, global_rows=len(rows),
                           guide=guide).texts
        texts = gather_object(texts) if acc.num_processes > 1 else texts
        for rec, text in zip(rows, texts):
            if rec.source not in kept and is_correct(text, rec, task) and not is_leak(text, rec, task):
                kept[rec.source] = replace(rec, solution=text.strip())
        used += len(rows)
        bar.update(len(rows))
        bar.set_postfix(solved=f"{len(kept)}/{start + len(problems)}", refresh=False)
    bar.close()
    lm.train(was_training)
    stats = {"bootstrap/rollouts": used, "bootstrap/problems": len(pending), "bootstrap/solved": len(kept)}
    log(f"bootstrap: {len(kept)} of {len(pending)} answer-only problems solved with {used} samples "
        f"({cfg.bootstrap_rollout} rollouts, k={k})")
    solved = [r for r in records if r.solution] + list(kept.values())
    return solved, stats


def save(records: list[Record], path: Path) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")


def load(path: Path) -> list[Record]:
    return [Record(**json.loads(line)) for line in open(path) if line.strip()]
