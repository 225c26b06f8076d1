"""`handrail probe`: before any training, whether the privileged teacher can help this model on
this data, and why.

Self-distillation from a privileged teacher assumes a model that *uses* a reference: shown a
solution, it solves the problem better, working from the student's own attempt instead of copying
the reference's answer. A model can fail that in two ways, and the probe looks for both on
held-out records:

- it **ignores** the reference: the teacher shown the right reference does no better than the
  teacher shown another record's (a *shuffled* reference). Then nothing privileged is there to
  distil, and self-distillation can give no more than distillation without a reference (or SFT);
- it **copies**: shown another record's reference, the teacher does worse than the student alone
  (it writes what it is shown, right or wrong), or shown the real one it states the answer before
  the work far more often than the student does. A target built from it hands the student answers
  it cannot justify: the guessing the aggregate exists to block.

Every pass@1 is greedy and scored both strictly (the verifier's format) and leniently (the answer
where a reader finds it: answers.py). On the student's own sampled attempts (what training sees),
the probe also measures the teacher's KL to the student, the share of positions where the
aggregate (the training config's rule) moves the student, and the share the divergence gate
silences; for the embedded tasks, whether the teacher continues from a student's slip or copies
the reference's numbers. It ends with a one-line verdict and its reason. `html_report` draws the
attempts token by token (probe_html.py).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import torch

from handrail.errors import UsageError
from handrail.data.records import Record, hint_for, reference_answer, teacher_prompt
from handrail.data.datafile import shuffle_references
from handrail.runtime.evaluate import evaluate, fit_records, prompt_ids, prompt_limit
from handrail.runtime.models import HiddenStates, load_model, stop_ids
from handrail.engine.rollout import sample
from handrail.engine.targets import counterfactual, kl as kl_div

TOP = 3  # most likely next tokens kept per position for the HTML view


def _margin(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two rates measured on n records each (at least 5
    points): smaller differences are not told apart from chance."""
    return max(0.05, 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1)))


def states_answers_first(leak_teacher: float, leak_student: float, n: int) -> bool:
    """The teacher, shown the reference, states the answer before the work more often than the
    student alone, beyond chance on n records: the probe's `copies` by leak, and what
    counterfactual=auto turns the counterfactual teacher on for (train.resolve_counterfactual)."""
    return leak_teacher > leak_student + _margin(leak_teacher, leak_student, n)


def _remedy(r: dict) -> str:
    """What to do about a copying teacher, given whether the probe's config already does it."""
    if r["aggregate"].get("counterfactual", "none") != "none":
        return ("; with the counterfactual teacher (on) only what the right reference adds over a wrong one is "
                "distilled, which is what keeps such a teacher from teaching guessing")
    return ("; train with counterfactual=shuffled, which distils only what the right reference adds over a "
            "wrong one")


def verdict(r: dict) -> tuple[str, str]:
    """(kind, reason) from a probe's figures: `copies`, `ignores`, `gated` or `helps`."""
    n, s, t, sh = r["n"], r["student"]["lenient"], r["teacher"]["lenient"], r["shuffled"]["lenient"]
    lift = t - sh
    slip = r.get("slip")
    if lift < _margin(t, sh, n):
        return "ignores", (f"the reference lifts the teacher only {100 * lift:+.0f} points over another record's "
                           f"({t:.0%} vs {sh:.0%}, n={n}): no privileged signal to distil, so expect no more than "
                           f"distillation without a reference, or SFT")
    if sh < s - _margin(s, sh, n):
        return "copies", (f"shown another record's reference the teacher drops to {sh:.0%}, below the student "
                          f"alone ({s:.0%}): it writes what it is shown, right or wrong, so its target would hand "
                          f"the student answers it cannot justify" + _remedy(r))
    if slip is not None and slip["copies_reference"] > slip["consistent"]:
        return "copies", (f"after a student's slip the teacher writes the reference's next result "
                          f"({slip['copies_reference']:.0%}) more often than continuing from the slip "
                          f"({slip['consistent']:.0%}): its target would hand over the reference's numbers" + _remedy(r))
    leak_t, leak_s = r["teacher"]["leak"], r["student"]["leak"]
    if states_answers_first(leak_t, leak_s, n):
        return "copies", (f"shown the reference the teacher states the answer before the work in {leak_t:.0%} of "
                          f"attempts (the student alone: {leak_s:.0%}): a target from it teaches guessing" + _remedy(r))
    if r["aggregate"]["gated"] > 0.8:
        return "gated", (f"the reference lifts the teacher {100 * lift:+.0f} points over another record's, but the "
                         f"divergence gate silences {r['aggregate']['gated']:.0%} of the student's positions: the "
                         f"teacher is heard only at the start of each attempt (lower gate_prob, or gate=none)")
    return "helps", (f"the reference lifts the teacher {100 * lift:+.0f} points over another record's ({t:.0%} vs "
                     f"{sh:.0%}; the student alone {s:.0%}): privileged signal that self-distillation can use")


def _scores(res: dict) -> dict:
    return {"strict": res["accuracy"], "lenient": res["accuracy_lenient"], "leak": res["leak_rate"]}


@torch.no_grad()
def aggregate_stats(model, tokenizer, student_ids, teacher_ids, rollout, rule, gate: str, gate_prob: float,
                    intervene_kl: float, keep: int = 0, batch: int = 4,
                    counter_ids=None) -> tuple[dict, list[dict]]:
    """On sampled attempts: mean KL(p_T || p_S), mean KL(q || p_S), the share of positions where q
    moves the student by more than `intervene_kl`, and the share the gate silences (and of the
    movement there). With `counter_ids` (prompts showing a wrong reference) the rule reads the
    counterfactual teacher (targets.counterfactual), as training with counterfactual=shuffled
    does. The first `keep` attempts are also returned token by token (for the HTML view): text,
    movement, gate, and the most likely next tokens of student, teacher and target."""
    from handrail.methods import completion_hidden, until_divergence
    from handrail.engine.rollout import Rollout

    pad, head = tokenizer.pad_token_id, model.get_output_embeddings()
    lm = HiddenStates(model)
    sums = dict(tokens=0.0, raw_kl=0.0, kl=0.0, moved=0.0, gated=0.0, gated_kl=0.0)
    shown = []
    for s in range(0, len(student_ids), batch):
        rows = slice(s, s + batch)
        mask = rollout.completion_mask[rows]
        width = max(1, int(mask.sum(1).max().item()))
        part = Rollout(student_ids[rows], rollout.completion_ids[rows, :width], mask[:, :width],
                       rollout.logprobs[rows, :width], rollout.texts[rows])
        mask = part.completion_mask
        logp_S = torch.log_softmax(head(completion_hidden(lm, student_ids[rows], part, pad)).float(), -1)
        logp_T = torch.log_softmax(head(completion_hidden(lm, teacher_ids[rows], part, pad)).float(), -1)
        teacher = logp_T
        if counter_ids is not None:  # the student has not moved: p_0 is p_S
            logp_C = torch.log_softmax(head(completion_hidden(lm, counter_ids[rows], part, pad)).float(), -1)
            teacher = counterfactual(logp_T, logp_C, logp_S)
        logq = rule(logp_S, teacher, None)
        raw, moved_kl = kl_div(logp_T, logp_S), kl_div(logq, logp_S)
        kept = mask
        if gate != "none":
            lp_T = logp_T.gather(-1, part.completion_ids[..., None]).squeeze(-1)
            kept = until_divergence(lp_T, mask, gate_prob, only_at=gate == "point")
        silenced = mask - kept
        sums["tokens"] += mask.sum().item()
        sums["raw_kl"] += (raw * mask).sum().item()
        sums["kl"] += (moved_kl * mask).sum().item()
        sums["moved"] += ((moved_kl > intervene_kl).float() * mask).sum().item()
        sums["gated"] += silenced.sum().item()
        sums["gated_kl"] += (moved_kl * silenced).sum().item()
        for i in range(mask.shape[0]):
            if len(shown) >= keep:
                break
            shown.append(_tokens(tokenizer, part.completion_ids[i], mask[i], moved_kl[i], silenced[i],
                                 logp_S[i], logp_T[i], logq[i]))
    n = max(sums["tokens"], 1.0)
    return {"tokens": int(sums["tokens"]), "raw_kl": sums["raw_kl"] / n, "kl": sums["kl"] / n,
            "moved": sums["moved"] / n, "gated": sums["gated"] / n,
            "gated_share_of_movement": sums["gated_kl"] / max(sums["kl"], 1e-12)}, shown


def _tokens(tokenizer, ids, mask, moved, silenced, logp_S, logp_T, logq) -> list[dict]:
    """One attempt, token by token, for the HTML view."""
    n = int(mask.sum().item())
    out = []
    for t in range(n):
        row = {"text": tokenizer.decode([int(ids[t])]), "moved": round(float(moved[t]), 4),
               "silenced": bool(silenced[t] > 0)}
        for name, lp in (("student", logp_S[t]), ("teacher", logp_T[t]), ("target", logq[t])):
            p, idx = lp.exp().topk(TOP)
            row[name] = [[tokenizer.decode([int(j)]), round(float(v), 3)] for v, j in zip(p, idx)]
        out.append(row)
    return out


def slip_continuation(model, tokenizer, templates, task, records: list[Record], seed: int = 0) -> dict:
    """Embedded tasks: a slip is put into one step of each worked solution, as a student might make,
    and the teacher (shown the full reference) continues greedily from the slipped prefix. Its next
    line is *consistent* (the correct next step from the slipped value), *copies_reference* (the
    reference's next result, which the student's work does not justify) or *other*."""
    rng = random.Random(seed)
    prompts, expected, copied = [], [], []
    for rec in records:
        prefix, continuation = task.detour(rec.solution, rng)
        k = prefix.count("\n")  # lines given, the slip being the last
        prompts.append(tokenizer(teacher_prompt(tokenizer, rec, templates) + prefix,
                                 add_special_tokens=False)["input_ids"])
        expected.append(continuation.splitlines()[0])
        copied.append(rec.solution.splitlines()[k])
    out = sample(model, tokenizer, prompts, max_new_tokens=16, stop_ids=stop_ids(tokenizer), temperature=0)
    firsts = [t.splitlines()[0] if t else "" for t in out.texts]

    def result(line):
        return line.rsplit("=", 1)[-1].replace("####", "").strip()

    n = len(records)
    consistent = sum(f == e for f, e in zip(firsts, expected)) / n
    copies = sum(f != e and result(f) == result(c) for f, e, c in zip(firsts, expected, copied)) / n
    return {"consistent": consistent, "copies_reference": copies, "other": 1 - consistent - copies, "n": n}


def probe(cfg, n: int = 64, html_attempts: int = 0, log=print) -> dict:
    """Probe `cfg.model` on `n` held-out records of `cfg.task` / `cfg.eval_data` / `cfg.data`, with
    `cfg`'s templates, generation length, hint (the teacher sees the reference, or with
    hint=answer only the answer), aggregation rule and gate (a TrainConfig: what training would
    use). Returns the figures, the verdict and, with `html_attempts`, that many attempts token
    by token."""
    from handrail.commands.sources import eval_records, model_folder

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task, records = eval_records(cfg.task, cfg.eval_data or cfg.data, cfg.level, n, cfg.fields, cfg.verifier)
    records = [r for r in records if r.completion is None and reference_answer(r) is not None]
    if len(records) < 2:
        raise UsageError("probe: needs at least 2 records with a reference or an answer (and not logged turns)")
    model, tok, tpl = load_model(model_folder(cfg.model), templates=cfg.templates)
    limit = prompt_limit(model, cfg.max_new_tokens)
    records = fit_records(tok, records, tpl, limit, cfg.truncate, ("none", "solution", "answer"))
    others = fit_records(tok, shuffle_references(records, cfg.seed, cfg.hint), tpl, limit, cfg.truncate, ("solution",))
    common = dict(task=task, samples=0, max_new_tokens=cfg.max_new_tokens)
    report = {"model": cfg.model, "data": cfg.eval_data or cfg.data, "task": None if cfg.data else (cfg.task or "chain"),
              "n": len(records), "max_new_tokens": cfg.max_new_tokens}
    for key, recs, hint in (("student", records, "none"), ("teacher", records, cfg.hint),
                            ("shuffled", others, "solution"), ("answer_only", records, "answer")):
        report[key] = _scores(evaluate(model, tok, tpl, recs, hint=hint, **common))
        log(f"probe: {key:<11} pass@1 {report[key]['strict']:.1%} strict, {report[key]['lenient']:.1%} lenient, "
            f"leak {report[key]['leak']:.1%}")
    student_ids, teacher_ids = prompt_ids(tok, records, tpl), prompt_ids(tok, records, tpl, hint=cfg.hint)
    attempts = sample(model, tok, student_ids, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids(tok),
                      temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    counterfactual = cfg.counterfactual
    if counterfactual == "auto":  # as training resolves it (train.resolve_counterfactual), on these records
        on = states_answers_first(report["teacher"]["leak"], report["student"]["leak"], len(records))
        counterfactual = "shuffled" if on else "none"
    counter_ids = None
    if counterfactual != "none":  # the next record's reference, as training takes the next in its batch
        wrong = [replace(r, solution=hint_for(records[(i + 1) % len(records)], cfg.hint)) for i, r in enumerate(records)]
        counter_ids = prompt_ids(tok, wrong, tpl, hint="solution")
    report["aggregate"], shown = aggregate_stats(
        model, tok, student_ids, teacher_ids, attempts, cfg.aggregation_rule(), cfg.gate, cfg.gate_prob,
        cfg.intervene_kl, keep=html_attempts, counter_ids=counter_ids)
    report["aggregate"].update(rule=cfg.rule, gate=cfg.gate, gate_prob=cfg.gate_prob, intervene_kl=cfg.intervene_kl,
                               counterfactual=counterfactual)
    if task is not None and hasattr(task, "detour"):
        report["slip"] = slip_continuation(model, tok, tpl, task, records, cfg.seed)
    report["verdict"], report["reason"] = verdict(report)
    report["seconds"] = round(time.time() - t0, 1)
    if shown:
        report["attempts"] = [{"problem": r.text, "answer": reference_answer(r), "tokens": toks}
                              for r, toks in zip(records, shown)]
    return report


def table(r: dict) -> str:
    """The probe's figures as a small table, the verdict last."""
    lines = ["| who | pass@1 strict | pass@1 lenient | leak |", "|---|---|---|---|"]
    for key, name in (("student", "student alone"), ("teacher", "teacher + reference"),
                      ("shuffled", "teacher + another record's reference"),
                      ("answer_only", "teacher + the answer only")):
        lines.append(f"| {name} | {r[key]['strict']:.1%} | {r[key]['lenient']:.1%} | {r[key]['leak']:.1%} |")
    a = r["aggregate"]
    lines += ["", f"on the student's own sampled attempts ({a['tokens']} tokens): KL(teacher || student) "
                  f"{a['raw_kl']:.3f} nats per token; the aggregate ({a['rule']}"
                  f"{', counterfactual teacher' if a.get('counterfactual', 'none') != 'none' else ''}) moves the student by > "
                  f"{a['intervene_kl']:g} nats at {a['moved']:.1%} of positions ({a['kl']:.3f} nats per token); the "
                  f"gate ({a['gate']}) silences {a['gated']:.1%} of positions, "
                  f"{a['gated_share_of_movement']:.1%} of the movement"]
    if "slip" in r:
        s = r["slip"]
        lines.append(f"after a student's slip the teacher continues from it {s['consistent']:.1%}, writes the "
                     f"reference's next result {s['copies_reference']:.1%}, other {s['other']:.1%}")
    if r["student"]["lenient"] - r["student"]["strict"] > 0.1:
        lines.append(f"note: the student solves {r['student']['lenient']:.0%} leniently but writes the verifier's "
                     f"format in only {r['student']['strict']:.0%}: judge training by the lenient score, or teach "
                     f"the format first (a short SFT warm start)")
    lines += ["", f"verdict: {r['verdict']}: {r['reason']}", f"(n={r['n']}, {r['seconds']:.0f}s)"]
    return "\n".join(lines)
