"""`handrail pretrain`: build a tiny Llama model and character tokenizer from scratch, trained on
plain (student-template) and hinted (teacher-template) examples of a task or a data file.

The default task is tuned so that the result leaves room to learn: on the post-training split
the plain student solves a minority of problems, while the same model shown the worked solution
solves nearly all of them. That gap is what self-distillation has to close.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from handrail.data import TINY_TEMPLATES, Record, hint_for, load_records, records_from_task, reference_answer
from handrail.data import student_prompt, teacher_prompt
from handrail.evaluate import evaluate
from handrail.models import build_char_tokenizer, build_tiny_model, save_model
from handrail.tasks import ANSWER_MARK, DEFAULT_TASK, get_task


@dataclass
class PretrainConfig:
    out: str = "runs/base"  # output folder (an HF model folder)
    task: str | None = None  # embedded task name (default: chain); ignored with `data`
    data: str | None = None  # JSONL/Parquet/datasets file instead of a task
    seconds: float = 900.0  # wall-clock safety cap only; the step budget ends a normal run (~270 s here)
    max_steps: int = 500  # optimizer steps (the budget; `seconds` is only a safety cap)
    batch_size: int = 64
    lr: float = 3e-3
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seed: int = 1  # seeds 1..3 of this recipe gave student 15/9/10% (BENCHMARKS.md §1)
    n_problems: int = 20000  # training problems drawn from the task (per level mix)
    plain_frac: float = 0.5  # share of plain student-prompt examples (rest are hinted)
    answer_hint_frac: float = 0.3  # share of hinted examples whose hint is only the final answer
    direct_plain: float = 0.05  # answer-first completions for plain prompts (a rare guess)
    direct_answer_hint: float = 0.5  # answer-first completions when the hint is the bare answer
    detour_frac: float = 0.0  # solution-hinted examples that leave the hint's path (task.detour); see benchmarks/README.md
    eval_n: int = 200  # held-out problems for the closing report
    threads: int = 1  # torch threads; pinned because the result depends on it (BENCHMARKS.md §1); 0 = all
    levels: str = ""  # task levels to train on, e.g. "1,2,3,4,5,6" (default: the task's pretrain levels)
    hinted_only_levels: str = ""  # levels shown only with a hint: the student never practises them alone

    def validate(self):
        if self.task and self.data:
            raise ValueError("give --task or --data, not both")
        for key in ("levels", "hinted_only_levels"):
            try:
                _levels(getattr(self, key))
            except ValueError:
                raise ValueError(f"config key {key!r}: expected comma-separated integers, got "
                                 f"{getattr(self, key)!r}") from None


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(",") if x.strip())


def _direct(rec: Record) -> str:
    """An answer-first completion: the final answer with no work before it."""
    return f"{ANSWER_MARK} {reference_answer(rec)}"


def build_examples(records: list[Record], cfg: PretrainConfig, tokenizer, rng: random.Random, task=None):
    """(prompt_ids, completion_ids) pairs; a detour's given prefix goes on the prompt side, so it
    carries no loss. The answer-first share differs by prompt type on
    purpose: a model that has been told the answer is much more tempted to just state it, which is
    the 'impossible knowledge' a privileged teacher can leak (see benchmarks/impossible_knowledge)."""
    out = []
    hinted_only = set(_levels(cfg.hinted_only_levels))
    for rec in records:
        u = rng.random()
        plain_frac = 0.0 if rec.level in hinted_only else cfg.plain_frac
        if u < plain_frac:
            prompt, direct = student_prompt(tokenizer, rec, TINY_TEMPLATES), cfg.direct_plain
        elif u < plain_frac + (1 - plain_frac) * cfg.answer_hint_frac:
            prompt = teacher_prompt(tokenizer, rec, TINY_TEMPLATES, hint_for(rec, "answer"))
            direct = cfg.direct_answer_hint
        else:
            prompt, direct = teacher_prompt(tokenizer, rec, TINY_TEMPLATES, hint_for(rec, "solution")), 0.0
            detour = task.detour(rec.solution, rng) if task and rng.random() < cfg.detour_frac else None
            if detour:
                out.append((tokenizer(prompt + detour[0])["input_ids"],
                            tokenizer(detour[1])["input_ids"] + [tokenizer.eos_token_id]))
                continue
        completion = _direct(rec) if rec.solution is None or rng.random() < direct else rec.solution
        out.append((tokenizer(prompt)["input_ids"],
                    tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]))
    return out


def collate(examples, pad_id: int):
    """Right-padded (ids, labels) with the loss only on completion tokens."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for i, (p, c) in enumerate(examples):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return ids, labels


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, log)
    finally:
        torch.set_num_threads(threads)  # what runs next in this process (demo's training) gets them back


def _pretrain(cfg: PretrainConfig, log) -> dict:
    rng = random.Random(cfg.seed)
    task = None
    if cfg.data:
        records = load_records(cfg.data)
        rng.shuffle(records)
        n_eval = min(cfg.eval_n, max(1, len(records) // 10))
        eval_records, records = records[:n_eval], records[n_eval:]
    else:
        task = get_task(cfg.task or DEFAULT_TASK)
        levels = _levels(cfg.levels) or task.pretrain_levels
        per_level = cfg.n_problems // len(levels)
        records = [r for lv in levels
                   for r in records_from_task(task.split("train", per_level, lv, seed=cfg.seed))]
        eval_records = records_from_task(task.split("test", cfg.eval_n))
    texts = [student_prompt(None, r, TINY_TEMPLATES) + teacher_prompt(None, r, TINY_TEMPLATES, hint_for(r, "solution"))
             + _direct(r) for r in records + eval_records]
    tokenizer = build_char_tokenizer(texts)
    examples = build_examples(records, cfg, tokenizer, rng, task)
    max_len = max(len(p) + len(c) for p, c in examples)
    model = build_tiny_model(len(tokenizer), cfg.d_model, cfg.n_layers, cfg.n_heads,
                             max_len=max(256, 2 * max_len), seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretraining a {n_params / 1e6:.2f}M-parameter model on {len(examples)} examples "
        f"({'data ' + cfg.data if cfg.data else 'task ' + task.name}), budget {cfg.seconds:.0f}s")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    t0, step, warmup = time.time(), 0, 50
    bar = tqdm(total=cfg.max_steps, desc="pretrain", unit="step", dynamic_ncols=True)
    while step < cfg.max_steps and time.time() - t0 < cfg.seconds:
        # the schedule depends on the step only: a time-based one would make the model depend on
        # machine load (the `seconds` cap only stops a run that is far slower than expected)
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = collate(rng.sample(examples, min(cfg.batch_size, len(examples))), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    bar.close()
    train_seconds = time.time() - t0
    model.eval()
    save_model(model, tokenizer, cfg.out, TINY_TEMPLATES,
               extra={"task": task.name if task else None, "data": cfg.data, "params": n_params})
    common = dict(task=task, samples=0, max_new_tokens=_max_new(records))
    student = evaluate(model, tokenizer, TINY_TEMPLATES, eval_records, hint="none", **common)
    teacher = evaluate(model, tokenizer, TINY_TEMPLATES, eval_records, hint="solution", **common)
    result = {"out": cfg.out, "params": n_params, "steps": step, "train_seconds": round(train_seconds, 1),
              "student_accuracy": student["accuracy"], "teacher_accuracy": teacher["accuracy"],
              "student_leak_rate": student["leak_rate"], "eval_n": len(eval_records)}
    log(f"saved {cfg.out} after {step} steps in {train_seconds:.0f}s")
    log(f"student pass@1 (greedy, no hint): {student['accuracy']:.1%}   "
        f"teacher pass@1 (greedy, solution hint): {teacher['accuracy']:.1%}   (n={len(eval_records)})")
    return result


def _max_new(records: list[Record]) -> int:
    longest = max(len(r.solution or "") for r in records)
    return int(longest * 1.5) + 8
