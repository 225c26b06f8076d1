"""Held-out evaluation: greedy and sampled pass@1, leak rate, tokens and seconds."""

from __future__ import annotations

import time
from array import array
from dataclasses import replace

import torch

from handrail.data import DataError, Record, Templates, hint_for, reference_answer, student_prompt, teacher_prompt
from handrail.models import stop_ids
from handrail.rollout import sample
from handrail.tasks import StepArithmeticTask
from handrail.verifiers import FileTask


EXACT = FileTask("exact")  # what checks records from a file when no task or verifier is given


def is_correct(text: str, rec: Record, task: StepArithmeticTask | FileTask | None, lenient: bool = False) -> bool:
    """Strict: the verifier's own format; lenient: the final answer where a reader finds it (answers.py)."""
    ref = reference_answer(rec)
    if ref is None:
        return False
    task = task or EXACT
    return task.verify_lenient(text, ref) if lenient else task.verify(text, ref)


def is_leak(text: str, rec: Record, task: StepArithmeticTask | FileTask | None) -> bool:
    """Embedded tasks define their own leak (step lines before `####`); for user data (FileTask),
    the final answer written before any work, in any format (answers.stated_before_work)."""
    return (task or EXACT).leak(text, rec)


def prompt_ids(tokenizer, records: list[Record], templates: Templates, hint: str = "none") -> list[list[int]]:
    texts = [student_prompt(tokenizer, r, templates) if hint == "none"
             else teacher_prompt(tokenizer, r, templates, hint_for(r, hint)) for r in records]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # one call for the batch


class PromptIds:
    """`prompt_ids` that tokenizes each record's prompt once per hint: a run draws the same records
    step after step, and `fit_records` has tokenized every one of them before the first. At most
    `budget` tokens are kept (8 bytes each); past that, prompts are tokenized on every call."""

    def __init__(self, tokenizer, templates: Templates, budget: int = 1 << 24):
        self.tokenizer, self.templates, self.budget = tokenizer, templates, budget
        self._known: dict = {}  # (id(record), hint) -> (record, ids); the record kept so its id stays its own

    def __call__(self, records: list[Record], hint: str = "none") -> list[list[int]]:
        new = list({id(r): r for r in records if (id(r), hint) not in self._known}.values())
        made = dict(zip(map(id, new), prompt_ids(self.tokenizer, new, self.templates, hint)))
        for r in new:
            if self.budget >= len(made[id(r)]):
                self.budget -= len(made[id(r)])
                self._known[id(r), hint] = (r, array("q", made[id(r)]))
        return [list(self._known[id(r), hint][1]) if (id(r), hint) in self._known else list(made[id(r)])
                for r in records]


def prompt_limit(model, max_new_tokens: int) -> int | None:
    """How many tokens a prompt may have so that it and `max_new_tokens` fit in the model's
    positions (None: the model states no limit)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return None if positions is None else positions - max_new_tokens


def fit_records(tokenizer, records: list[Record], templates: Templates, limit: int | None,
                truncate: str = "error", hints: tuple[str, ...] = ("none", "solution"),
                ids: PromptIds | None = None) -> list[Record]:
    """Records whose prompts (student, and teacher with each of `hints`) fit in `limit` tokens.
    `error` names the first record that does not; `left` drops the start of its problem text, so
    the end (usually the question itself) is kept. Nothing is ever sized by an unbounded prompt.
    `ids` (PromptIds) keeps the token ids made here for the run that uses the records."""
    if limit is None:
        return records
    ids = ids or PromptIds(tokenizer, templates, budget=0)

    def usable(rec: Record) -> list[str]:
        return [h for h in hints if h in ("none", "blank") or rec.solution or h == "answer" and rec.answer is not None]

    def longest(rec: Record) -> int:
        return max(len(p) for h in usable(rec) for p in ids([rec], h))

    lengths = [0] * len(records)
    for h in hints:  # one batched tokenizer call per hint, not one per record
        rows = [i for i, rec in enumerate(records) if h in usable(rec)]
        for i, p in zip(rows, ids([records[i] for i in rows], h)):
            lengths[i] = max(lengths[i], len(p))
    out = list(records)
    for i in (i for i, n in enumerate(lengths) if n > limit):
        rec, n = records[i], lengths[i]
        if truncate == "left" and isinstance(rec.prompt, str):
            text_ids = tokenizer(rec.prompt, add_special_tokens=False)["input_ids"]
            keep = len(text_ids) - (n - limit)
            if keep > 0:
                rec = replace(rec, prompt=tokenizer.decode(text_ids[-keep:]))
                n = longest(rec)
        if n > limit:
            raise DataError(f"{rec.source}: field 'prompt': {n} tokens with its template, more than the "
                            f"{limit} the model's positions leave beside the completion; shorten it"
                            + ("" if truncate == "left" else ", or truncate it from the left (train: truncate=left; eval: --truncate left)"))
        out[i] = rec
    return out


@torch.no_grad()
def evaluate(model, tokenizer, templates: Templates, records: list[Record], *,
             task: StepArithmeticTask | None = None, hint: str = "none", samples: int = 1,
             max_new_tokens: int = 96, batch_size: int = 64, temperature: float = 1.0,
             seed: int = 0, progress=None, completions: list | None = None) -> dict:
    """Greedy pass@1 (`accuracy`, strict; `accuracy_lenient`), mean pass@1 over `samples` draws at
    `temperature` (`accuracy_sampled`, `accuracy_sampled_lenient`), the greedy leak rate and
    greedy tokens per solved problem. `samples=0` skips sampling. With a `completions` list, each
    problem's greedy completion is appended to it as a dict (problem, completion, correct,
    correct_lenient, leak, reference answer), in the records' order."""
    was_training = model.training
    model.eval()
    t0, stops = time.time(), stop_ids(tokenizer)
    ids = prompt_ids(tokenizer, records, templates, hint)
    greedy_ok = greedy_lenient = leaks = sampled_ok = sampled_lenient = tokens = solved_tokens = 0
    for start in range(0, len(records), batch_size):
        recs, batch = records[start:start + batch_size], ids[start:start + batch_size]
        g = sample(model, tokenizer, batch, max_new_tokens=max_new_tokens, stop_ids=stops, temperature=0)
        tokens += g.n_tokens
        ok = [is_correct(t, r, task) for t, r in zip(g.texts, recs)]
        greedy_ok += sum(ok)
        loose = [is_correct(t, r, task, lenient=True) for t, r in zip(g.texts, recs)]
        greedy_lenient += sum(loose)
        solved_tokens += sum(n for n, good in zip(g.completion_mask.sum(1).tolist(), ok) if good)
        leaked = [is_leak(t, r, task) for t, r in zip(g.texts, recs)]
        leaks += sum(leaked)
        if completions is not None:
            completions += [{"problem": r.text, "completion": t, "correct": bool(c), "correct_lenient": bool(c2),
                             "leak": bool(lk), "answer": reference_answer(r)}
                            for r, t, c, c2, lk in zip(recs, g.texts, ok, loose, leaked)]
        for k in range(samples):
            s = sample(model, tokenizer, batch, max_new_tokens=max_new_tokens, stop_ids=stops,
                       temperature=temperature, seed=seed * 7919 + k * 104729 + start)
            tokens += s.n_tokens
            sampled_ok += sum(is_correct(t, r, task) for t, r in zip(s.texts, recs))
            sampled_lenient += sum(is_correct(t, r, task, lenient=True) for t, r in zip(s.texts, recs))
        if progress is not None:
            progress.update(len(recs))
    model.train(was_training)
    n = len(records)
    return {
        "accuracy": greedy_ok / n,
        "accuracy_lenient": greedy_lenient / n,
        "accuracy_sampled": sampled_ok / (n * samples) if samples else None,
        "accuracy_sampled_lenient": sampled_lenient / (n * samples) if samples else None,
        "leak_rate": leaks / n,
        "tokens_per_solved": solved_tokens / greedy_ok if greedy_ok else None,  # greedy, stop token included
        "n": n,
        "samples": samples,
        "hint": hint,
        "tokens": tokens,
        "seconds": round(time.time() - t0, 2),
    }
