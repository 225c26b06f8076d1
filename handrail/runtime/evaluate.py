"""Held-out evaluation: greedy and sampled pass@1, leak rate, tokens and seconds."""

from __future__ import annotations

import time
from array import array
from dataclasses import replace

import torch

from handrail.data.records import DataError, Record, Templates, hint_for, reference_answer, student_prompt, teacher_prompt
from handrail.data.datafile import Records
from handrail.runtime.models import stop_ids
from handrail.engine.rollout import sample
from handrail.data.tasks import StepArithmeticTask
from handrail.data.verifiers import FileTask


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


def judge(texts: list[str], records: list[Record], task) -> tuple[list[bool], list[bool], list[bool]]:
    """Each greedy completion against its record: correct strictly, correct leniently, leaked."""
    return ([is_correct(t, r, task) for t, r in zip(texts, records)],
            [is_correct(t, r, task, lenient=True) for t, r in zip(texts, records)],
            [is_leak(t, r, task) for t, r in zip(texts, records)])


def prompt_texts(tokenizer, records: list[Record], templates: Templates, hint: str = "none") -> list[str]:
    return [student_prompt(tokenizer, r, templates) if hint == "none"
            else teacher_prompt(tokenizer, r, templates, hint_for(r, hint)) for r in records]


def prompt_ids(tokenizer, records: list[Record], templates: Templates, hint: str = "none") -> list[list[int]]:
    texts = prompt_texts(tokenizer, records, templates, hint)
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # one call for the batch


class PromptIds:
    """`prompt_ids` that tokenizes each prompt text once: a run draws the same records step after
    step. Keyed by the rendered text (records read from a file are new objects on every read). At
    most `budget` tokens are kept (8 bytes each, beside their text); past that, prompts are
    tokenized on every call."""

    def __init__(self, tokenizer, templates: Templates, budget: int = 1 << 24):
        self.tokenizer, self.templates, self.budget = tokenizer, templates, budget
        self._known: dict[str, array] = {}

    def __call__(self, records: list[Record], hint: str = "none") -> list[list[int]]:
        texts = prompt_texts(self.tokenizer, records, self.templates, hint)
        new = [t for t in dict.fromkeys(texts) if t not in self._known]
        made = dict(zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"])) if new else {}
        for t, ids in made.items():
            if self.budget >= len(ids):
                self.budget -= len(ids)
                self._known[t] = array("q", ids)
        return [list(self._known[t]) if t in self._known else list(made[t]) for t in texts]


def prompt_limit(model, max_new_tokens: int) -> int | None:
    """How many tokens a prompt may have so that it and `max_new_tokens` fit in the model's
    positions (None: the model states no limit)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return None if positions is None else positions - max_new_tokens


def fit_records(tokenizer, records, templates: Templates, limit: int | None,
                truncate: str = "error", hints: tuple[str, ...] = ("none", "solution"),
                ids: PromptIds | None = None):
    """Records whose prompts (student, and teacher with each of `hints`) fit in `limit` tokens.
    `error` names the first record that does not; `left` drops the start of its problem text, so
    the end (usually the question itself) is kept. Nothing is ever sized by an unbounded prompt.
    `ids` (PromptIds) keeps the token ids made here for the run that uses the records.
    A list is checked whole; a file's records (datafile.Records) give a `Fitted` view that checks a
    record when it is read, having checked now every record whose byte bound might not fit."""
    if limit is None:
        return records
    ids = ids or PromptIds(tokenizer, templates, budget=0)
    fit = _Fit(tokenizer, templates, limit, truncate, hints, ids)
    if isinstance(records, Records):
        return Fitted(records, fit)
    lengths = [0] * len(records)
    for h in hints:  # one batched tokenizer call per hint, not one per record
        rows = [i for i, rec in enumerate(records) if h in fit.usable(rec)]
        for i, p in zip(rows, ids([records[i] for i in rows], h)):
            lengths[i] = max(lengths[i], len(p))
    out = list(records)
    for i in (i for i, n in enumerate(lengths) if n > limit):
        out[i] = fit(records[i], lengths[i])
    return out


class _Fit:
    """One record made to fit, or a DataError naming it."""

    def __init__(self, tokenizer, templates, limit, truncate, hints, ids):
        self.tokenizer, self.templates, self.limit, self.truncate, self.hints, self.ids = (
            tokenizer, templates, limit, truncate, hints, ids)

    def usable(self, rec: Record) -> list[str]:
        return [h for h in self.hints if h in ("none", "blank") or rec.solution or h == "answer" and rec.answer is not None]

    def longest(self, rec: Record) -> int:
        return max(len(p) for h in self.usable(rec) for p in self.ids([rec], h))

    def __call__(self, rec: Record, n: int | None = None) -> Record:
        n = self.longest(rec) if n is None else n
        if n <= self.limit:
            return rec
        for _ in range(3 if self.truncate == "left" else 0):  # a chat template's count is not additive: re-measure
            cut = self._cut_left(rec, n - self.limit)
            if cut is None:
                break
            rec, n = cut, self.longest(cut)
            if n <= self.limit:
                break
        if n > self.limit:
            raise DataError(f"{rec.source}: field 'prompt': {n} tokens with its template, more than the "
                            f"{self.limit} the model's positions leave beside the completion; shorten it"
                            + ("" if self.truncate == "left" else ", or truncate it from the left (train: truncate=left; eval: --truncate left)"))
        return rec

    def _cut_left(self, rec: Record, excess: int) -> Record | None:
        """`rec` with `excess` tokens dropped from the start of its text: a plain prompt's beginning,
        or a conversation's earliest turns (a turn emptied is dropped; the last user turn, which
        the template wraps, is kept whole). None if there is nothing left to drop."""
        def cut(text: str, k: int) -> tuple[str, int]:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return self.tokenizer.decode(ids[min(k, len(ids)):]), min(k, len(ids))

        if isinstance(rec.prompt, str):
            text, dropped = cut(rec.prompt, excess)
            return replace(rec, prompt=text) if dropped and text else None
        earlier, dropped = [], 0
        for m in rec.prompt[:-1]:
            text, k = cut(m["content"], excess - dropped) if dropped < excess else (m["content"], 0)
            dropped += k
            if text:
                earlier.append({**m, "content": text})
        return replace(rec, prompt=earlier + list(rec.prompt[-1:])) if dropped else None

    def overhead(self) -> int:
        """Bytes the templates add around a record's own text (tokens <= bytes for byte-level and
        character tokenizers, so text bytes + this bounds a prompt's tokens)."""
        empty = Record("", "", "")
        return max(len(t.encode()) for h in self.hints for t in prompt_texts(self.tokenizer, [empty], self.templates, h))


class Fitted(Records):
    """A file's records made to fit when read. Records whose byte bound exceeds the limit are
    tokenised and checked at once, so a prompt too long for the model is named before training;
    with a tokenizer that can make more tokens than bytes the check on reading still names it."""

    def __init__(self, base: Records, fit: _Fit):
        self.base, self.fit, self.facts = base, fit, base.facts
        margin = fit.limit - fit.overhead()
        self.fixed = {}  # index -> the record truncated to fit
        for i, bound in enumerate(base.bounds()):
            if bound > margin:
                rec = base[i]
                if (fitted := fit(rec)) is not rec:
                    self.fixed[i] = fitted

    def __len__(self) -> int:
        return len(self.base)

    def _record(self, i: int) -> Record:
        return self.fixed[i] if i in self.fixed else self.fit(self.base[i])

    def bounds(self):
        return self.base.bounds()


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
        ok, loose, leaked = judge(g.texts, recs, task)
        greedy_ok, greedy_lenient, leaks = greedy_ok + sum(ok), greedy_lenient + sum(loose), leaks + sum(leaked)
        solved_tokens += sum(n for n, good in zip(g.completion_mask.sum(1).tolist(), ok) if good)
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
