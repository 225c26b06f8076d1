"""`handrail pretrain`: build a tiny Llama model and character tokenizer from scratch, trained on
plain (student-template) and hinted (teacher-template) examples of a task or a data file.

The default recipe leaves room to learn *by construction*, not by stopping training at the right
moment (BENCHMARKS.md §L1):

- the student's own worked solutions carry the task's misconception at a fixed rate
  (`misconception`; tasks.py), so under greedy decoding the student gets every affected step wrong
  however well it has learned the rest; sampling still finds the right step sometimes, so a
  reward has something to find;
- the teacher (hinted prompts) sees full references, terse ones that skip intermediate results,
  or only the answer, and `detour_frac` of its full-reference examples leave the reference's path
  and continue correctly from the slipped value, so the teacher works from the student's path
  instead of copying the reference's numbers (benchmarks/teacher_probe.py);
- `hinted_only_levels` are never practised unaided: a level too hard for the student alone. A
  data file has no levels, so its hardest records (most solution lines, `hard_frac`) play that
  part, and the closing check evaluates on held-out records of them.

`band()` checks the result and says what to change when a build misses it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from handrail.errors import UsageError
from handrail.runtime.cpu import keep_freed_memory
from handrail.data.records import TINY_TEMPLATES, DataError, Record, hint_for, records_from_task, reference_answer
from handrail.data.datafile import load_records
from handrail.data.records import student_prompt, teacher_prompt
from handrail.runtime.evaluate import evaluate
from handrail.runtime.models import build_char_tokenizer, build_tiny_model, save_model
from handrail.data.answers import ANSWER_MARK
from handrail.data.tasks import DEFAULT_TASK, get_task
from handrail.data.verifiers import FileTask
from handrail.folders import FolderLock, progress, writing


@dataclass
class PretrainConfig:
    out: str = "runs/base"  # output folder (an HF model folder)
    task: str | None = None  # embedded task name (default: chain); ignored with `data`
    data: str | None = None  # JSONL/Parquet/datasets file instead of a task
    fields: str | None = None  # data: other field names, "prompt=question,solution=answer"
    verifier: str = "exact"  # data: how the closing check verifies answers: exact | math | module:function
    seconds: float = 0.0  # optional wall-clock cap (0: none); a capped run is marked as not the recipe's
    max_steps: int = 1300  # optimizer steps: the budget that ends a run
    batch_size: int = 64
    lr: float = 3e-3
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seed: int = 1  # seeds 1-3 x native, AVX2 and default instruction sets: 9 of 9 builds in the band (BENCHMARKS.md §L1)
    n_problems: int = 20000  # training problems drawn from the task (per level mix)
    plain_frac: float = 0.4  # share of plain student-prompt examples (rest are hinted: the teacher has more to learn)
    answer_hint_frac: float = 0.2  # share of hinted examples whose hint is only the final answer
    terse_hint_frac: float = 0.15  # share of the other hinted examples whose reference is terse (tasks only)
    direct_plain: float = 0.05  # answer-first completions for plain prompts (a rare guess)
    direct_answer_hint: float = 0.5  # answer-first completions when the hint is the bare answer
    detour_frac: float = 0.6  # full-reference examples that leave the hint's path and continue from the slip (tasks only)
    misconception: float = 0.8  # the student's own solutions: share of affected steps done the wrong way (tasks only)
    terse_own: float = 0.0  # the student's own solutions written two operations per line (tasks only): a shorter way the brevity curriculum can find
    misconception_levels: str = "3,4"  # levels whose student solutions carry it ("": all); fewer keep the teacher's arithmetic clean
    eval_n: int = 200  # held-out problems for the closing report
    threads: int = 2  # torch threads, pinned so that a machine builds the same model every time; 0 = all
    levels: str = ""  # task levels to train on, e.g. "1,2,3,4,5" ("": the task's own, 1-4)
    hinted_only_levels: str = ""  # levels shown only with a hint: the student never practises them alone
    hard_frac: float = 0.25  # data files: the share of records with the longest solutions, shown only with a hint

    RANGES = {
        "seconds": "[0, )", "max_steps": "[1, )", "batch_size": "[1, )", "lr": "(0, )", "d_model": "[1, )",
        "n_layers": "[1, )", "n_heads": "[1, )", "n_problems": "[1, )", "plain_frac": "[0, 1]",
        "answer_hint_frac": "[0, 1]", "terse_hint_frac": "[0, 1]", "direct_plain": "[0, 1]",
        "direct_answer_hint": "[0, 1]", "detour_frac": "[0, 1]", "misconception": "[0, 1]", "eval_n": "[1, )",
        "terse_own": "[0, 1]",
        "threads": "[0, )", "hard_frac": "[0, 1)",
    }

    def validate(self):
        from handrail.data.records import parse_fields
        from handrail.data.verifiers import load as load_verifier

        if self.task and self.data:
            raise UsageError("give --task or --data, not both")
        parse_fields(self.fields)
        load_verifier(self.verifier)
        if self.d_model % self.n_heads:
            raise UsageError(f"config key 'd_model': {self.d_model} is not divisible by n_heads={self.n_heads}")
        for key in ("levels", "hinted_only_levels", "misconception_levels"):
            try:
                _levels(getattr(self, key))
            except ValueError:
                raise UsageError(f"config key {key!r}: expected comma-separated integers, got "
                                 f"{getattr(self, key)!r}") from None


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(",") if x.strip())


def _steps(rec: Record) -> int:
    return len([line for line in (rec.solution or "").splitlines() if line.strip()])


def hardest(records: list[Record], frac: float, rng: random.Random) -> set[int]:
    """Indices of about `frac` of `records`, the ones with the most solution lines: whole lengths
    from the longest down, like a task's top levels, so that no problem of a hard length is
    practised unaided. The next length is taken only if that lands nearer `frac` than stopping
    short (a quarter of four equal lengths is the longest one, not half the file). Where one length
    holds so many records that taking it would give more than twice `frac`, records of that length
    are drawn at random to make up the share."""
    if frac <= 0 or not records:
        return set()
    by_steps: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        by_steps.setdefault(_steps(rec), []).append(i)
    want, chosen = frac * len(records), []
    for steps in sorted(by_steps, reverse=True):
        group = by_steps[steps]
        total = len(chosen) + len(group)
        if total > 2 * want:
            chosen += rng.sample(group, max(0, round(want) - len(chosen)))
            break
        if chosen and total - want > want - len(chosen):
            break
        chosen += group
        if total >= want:
            break
    return set(chosen)


def _direct(rec: Record) -> str:
    """An answer-first completion: the final answer with no work before it."""
    return f"{ANSWER_MARK} {reference_answer(rec)}"


def build_examples(records: list[Record], cfg: PretrainConfig, tokenizer, rng: random.Random, task=None,
                   hard: set[str] = frozenset()):
    """(prompt_ids, completion_ids, unlearned positions) triples; a detour's slipped value is read
    but carries no loss, so the teacher learns to copy the reference while on its path and to work
    from the slip after it, never to slip. Records whose `source` is in `hard` are shown only with
    a hint. The answer-first share differs by prompt type on purpose: a model that has
    been told the answer is much more tempted to just state it, which is the 'impossible
    knowledge' a privileged teacher can leak (BENCHMARKS.md §L3)."""
    out = []
    hinted_only = set(_levels(cfg.hinted_only_levels))
    bug_levels = set(_levels(cfg.misconception_levels)) or {rec.level for rec in records}

    def add(prompt: str, completion: str, unlearned: str = "", rest: str = ""):
        """`completion` carries the loss, then `unlearned` is read but not learned (a slip the
        model should not learn to make), then `rest` carries the loss again."""
        ids = [tokenizer(t)["input_ids"] if t else [] for t in (completion, unlearned, rest)]
        out.append((tokenizer(prompt)["input_ids"], ids[0] + ids[1] + ids[2] + [tokenizer.eos_token_id],
                    range(len(ids[0]), len(ids[0]) + len(ids[1]))))

    for rec in records:
        u = rng.random()
        plain_frac = 0.0 if rec.level in hinted_only or rec.source in hard else cfg.plain_frac
        if u < plain_frac:  # the student, writing its own solution
            rate = cfg.misconception if rec.level in bug_levels else 0.0
            # (terse_own 0 draws nothing, so the default recipe's random stream is unchanged)
            style = "student-terse" if cfg.terse_own and rng.random() < cfg.terse_own else "student"
            own = task.rewrite(rec.solution, style, rng, rate) if task else rec.solution
            prompt, completion, direct = student_prompt(tokenizer, rec, TINY_TEMPLATES), own, cfg.direct_plain
        elif u < plain_frac + (1 - plain_frac) * cfg.answer_hint_frac:  # the teacher, told only the answer
            prompt = teacher_prompt(tokenizer, rec, TINY_TEMPLATES, hint_for(rec, "answer"))
            completion, direct = rec.solution, cfg.direct_answer_hint
        else:  # the teacher, shown a full or terse reference
            terse = task.rewrite(rec.solution, "terse") if task and rng.random() < cfg.terse_hint_frac else None
            prompt = teacher_prompt(tokenizer, rec, TINY_TEMPLATES, terse or hint_for(rec, "solution"))
            completion, direct = rec.solution, 0.0
            detour = task.detour(rec.solution, rng) if task and rng.random() < cfg.detour_frac else None
            if detour and detour[0]:  # on the reference's path (copy it), a slip (not learned), then on from the slip
                on_path, slipped = detour[0].rstrip("\n").rsplit("=", 1)
                add(prompt, on_path + "=", slipped + "\n", detour[1])
                continue
            if detour:  # a valid path of its own from the start (sum: another order)
                add(prompt, detour[1])
                continue
        add(prompt, _direct(rec) if completion is None or rng.random() < direct else completion)
    return out


def _batches(examples, size: int, rng: random.Random, pool: int = 8):
    """Random batches, drawn `pool` at a time and formed from examples of similar length: the
    examples seen are the same as with plain random batches, with far less padding (about half
    the compute for the default mix of short and long examples)."""
    while True:
        drawn = sorted(rng.sample(examples, min(len(examples), size * pool)), key=lambda e: len(e[0]) + len(e[1]))
        group = [drawn[i:i + size] for i in range(0, len(drawn), size)]
        rng.shuffle(group)
        yield from group


def collate(examples, pad_id: int):
    """Right-padded (ids, labels) with the loss only on completion tokens, less each example's
    unlearned positions."""
    width = max(len(p) + len(c) for p, c, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for i, (p, c, unlearned) in enumerate(examples):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        learned = torch.tensor(c)
        learned[list(unlearned)] = -100
        labels[i, len(p):len(p) + len(c)] = learned
    return ids, labels


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # pretraining runs on the CPU (cpu.py)
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, once the input has been read
            return _pretrain(cfg, log, held)
    finally:
        torch.set_num_threads(threads)  # what runs next in this process (demo's training) gets them back


def _records(cfg: PretrainConfig, rng: random.Random, log):
    """(training records, the closing check's records, the task or None, the sources of the hard
    records shown only with a hint)."""
    task, hard = None, set()
    if cfg.data:
        records = list(load_records(cfg.data, cfg.fields))  # shuffled and split below
        rng.shuffle(records)
        # the closing check holds out records of the part the student never practises alone: the
        # part post-training is for (all records when hard_frac is 0)
        chosen = hardest(records, cfg.hard_frac, rng)
        pool = [r for i, r in enumerate(records) if i in chosen] or records
        n_eval = min(cfg.eval_n, max(1, len(pool) // 10))
        kept_out = {r.source for r in pool[:n_eval]}
        eval_records = pool[:n_eval]
        records = [r for r in records if r.source not in kept_out]
        if not records:
            raise DataError(f"{cfg.data}: {len(eval_records)} record(s), all held out for the closing check; "
                            f"pretraining needs at least 2")
        hard = {r.source for r in pool} - kept_out if chosen else set()
        if hard:
            log(f"{len(hard)} of {len(records)} records, those with at least {min(map(_steps, pool))} solution "
                f"lines, are shown only with a hint (hard_frac={cfg.hard_frac:g})")
    else:
        task = get_task(cfg.task or DEFAULT_TASK)
        levels = _levels(cfg.levels) or task.pretrain_levels
        per_level = cfg.n_problems // len(levels)
        records = [r for lv in levels
                   for r in records_from_task(task.split("train", per_level, lv, seed=cfg.seed))]
        eval_records = records_from_task(task.split("test", cfg.eval_n))
    return records, eval_records, task, hard


def _pretrain(cfg: PretrainConfig, log, held: contextlib.ExitStack) -> dict:
    rng = random.Random(cfg.seed)
    records, eval_records, task, hard = _records(cfg, rng, log)
    texts = [student_prompt(None, r, TINY_TEMPLATES) + teacher_prompt(None, r, TINY_TEMPLATES, hint_for(r, "solution"))
             + _direct(r) for r in records + eval_records]
    tokenizer = build_char_tokenizer(texts)
    examples = build_examples(records, cfg, tokenizer, rng, task, hard)
    held.enter_context(FolderLock(cfg.out))  # one build per folder
    max_len = max(len(p) + len(c) for p, c, _ in examples)
    model = build_tiny_model(len(tokenizer), cfg.d_model, cfg.n_layers, cfg.n_heads,
                             max_len=max(256, 2 * max_len), seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretraining a {n_params / 1e6:.2f}M-parameter model on {len(examples)} examples "
        f"({'data ' + cfg.data if cfg.data else 'task ' + task.name}), {cfg.max_steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    batches = _batches(examples, min(cfg.batch_size, len(examples)), rng)
    t0, step, warmup = time.time(), 0, 50
    bar = progress(cfg.max_steps, "pretrain", "step")
    while step < cfg.max_steps and not (cfg.seconds and time.time() - t0 >= cfg.seconds):
        # the schedule depends on the step only: a time-based one would make the model depend on
        # machine load (the `seconds` cap only stops a run that is far slower than expected)
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = collate(next(batches), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", refresh=False)
    bar.close()
    train_seconds = time.time() - t0
    model.eval()
    with writing(cfg.out):
        save_model(model, tokenizer, cfg.out, TINY_TEMPLATES,
                   extra={"task": task.name if task else None, "data": cfg.data, "params": n_params})
    common = dict(task=task or FileTask(cfg.verifier), samples=0, max_new_tokens=_max_new(records))
    student = evaluate(model, tokenizer, TINY_TEMPLATES, eval_records, hint="none", **common)
    teacher = evaluate(model, tokenizer, TINY_TEMPLATES, eval_records, hint="solution", **common)
    result = {"out": cfg.out, "params": n_params, "steps": step, "train_seconds": round(train_seconds, 1),
              "student_accuracy": student["accuracy"], "teacher_accuracy": teacher["accuracy"],
              "student_leak_rate": student["leak_rate"], "eval_n": len(eval_records),
              "complete": step == cfg.max_steps}
    log(f"saved {cfg.out} after {step} steps in {train_seconds:.0f}s")
    if step < cfg.max_steps:
        log(f"WARNING: the time cap seconds={cfg.seconds:g} stopped pretraining after {step} of {cfg.max_steps} "
            f"steps: this model is not the recipe's (recorded as \"complete\": false)")
    log(f"student pass@1 (greedy, no hint): {student['accuracy']:.1%}   "
        f"teacher pass@1 (greedy, solution hint): {teacher['accuracy']:.1%}   (n={len(eval_records)})")
    result["band"] = band(student["accuracy"], teacher["accuracy"], task is not None)
    if not result["band"]["ok"]:
        log(f"WARNING: {result['band']['message']}")
    recipe = {k: v for k, v in asdict(cfg).items() if k != "out"}  # no machine's paths in what is shared
    with writing(cfg.out):
        (Path(cfg.out) / "pretrain_config.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (Path(cfg.out) / "pretrain_result.json").write_text(  # last: a cached base is complete once it exists
            json.dumps({k: v for k, v in result.items() if k != "out"}, indent=2) + "\n")
    return result


STUDENT_BAND = (0.05, 0.40)  # held-out greedy pass@1 of the unaided student: room to learn, and something to start from
TEACHER_MIN = 0.80  # the same model shown the full reference must mostly get it right


def band(student: float, teacher: float, task: bool = True) -> dict:
    """Is this base a useful lab for privileged self-distillation, and if not, what to change
    (`task`: built on an embedded task, which has a misconception to tune, not a data file)."""
    lo, hi = STUDENT_BAND
    problems = []
    if teacher < TEACHER_MIN:
        problems.append(f"the teacher (shown the full reference) solves only {teacher:.1%} (< {TEACHER_MIN:.0%}): "
                        f"it has not learned to use the reference; raise max_steps or d_model/n_layers")
    if student < lo:
        problems.append(f"the unaided student solves {student:.1%} (< {lo:.0%}): too little to learn from; "
                        f"raise max_steps or plain_frac" + (", or lower misconception" if task else ", or lower hard_frac"))
    elif student > hi:
        problems.append(f"the unaided student already solves {student:.1%} (> {hi:.0%}): little room to learn; "
                        + ("raise misconception, or evaluate a harder level" if task else
                           "raise hard_frac, or lower max_steps"))
    return {"ok": not problems, "student_band": list(STUDENT_BAND), "teacher_min": TEACHER_MIN,
            "message": "; ".join(problems) or "in the lab's band"}


def _max_new(records: list[Record]) -> int:
    longest = max(len(r.solution or "") for r in records)
    return int(longest * 1.5) + 8
