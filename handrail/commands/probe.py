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

On a model the lean decoder takes, all of this is one decoding loop per chunk of records
(`joint_passes`): a step of many rows costs a small model little more than a step of few, the
attempts and the teachers fed them share their prompts' encodings, and a record's prompts for the
different passes encode their common opening (the chat template, the problem) once, so the probe
is faster than its passes one by one (BENCHMARKS.md §P2), with the same figures to float rounding.
"""

from __future__ import annotations

import math
import random
import time

import torch

from handrail.errors import UsageError
from handrail.data.records import Record, reference_answer, teacher_prompt
from handrail.data.datafile import shuffle_references
from handrail.runtime.evaluate import evaluate, fit_records, judge, prompt_ids, prompt_limit
from handrail.runtime.models import HiddenStates, load_model, stop_ids
from handrail.engine import decoder
from handrail.engine.rollout import choose, completion_texts, gumbel_noise, sample
from handrail.engine.targets import counterfactual, kl as kl_div

TOP = 3  # most likely next tokens kept per position for the HTML view
CHUNK = 64  # records whose passes decode as one batch (seven rows each: joint_passes)


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


def _greedy_scores(texts: list[str], records: list[Record], task) -> dict:
    """`_scores` of greedy completions, judged as `evaluate` judges them."""
    ok, loose, leaked = judge(texts, records, task)
    return {"strict": sum(ok) / len(records), "lenient": sum(loose) / len(records), "leak": sum(leaked) / len(records)}


class _Tally:
    """The movement's sums over attempt positions, and the figures the probe reports from them."""

    def __init__(self, intervene_kl: float):
        self.intervene_kl = intervene_kl
        self.sums = dict(tokens=0.0, raw_kl=0.0, kl=0.0, moved=0.0, gated=0.0, gated_kl=0.0)

    def add(self, raw, moved, mask, silenced) -> None:
        """KL(p_T || p_S) and KL(q || p_S) at some positions, which of them count (`mask`, 1.0) and
        which of those the gate silences."""
        s = self.sums
        s["tokens"] += mask.sum().item()
        s["raw_kl"] += (raw * mask).sum().item()
        s["kl"] += (moved * mask).sum().item()
        s["moved"] += ((moved > self.intervene_kl).float() * mask).sum().item()
        s["gated"] += silenced.sum().item()
        s["gated_kl"] += (moved * silenced).sum().item()

    def result(self) -> dict:
        s, n = self.sums, max(self.sums["tokens"], 1.0)
        return {"tokens": int(s["tokens"]), "raw_kl": s["raw_kl"] / n, "kl": s["kl"] / n, "moved": s["moved"] / n,
                "gated": s["gated"] / n, "gated_share_of_movement": s["gated_kl"] / max(s["kl"], 1e-12)}


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
    tally, shown = _Tally(intervene_kl), []
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
        tally.add(raw, moved_kl, mask, silenced)
        for i in range(mask.shape[0]):
            if len(shown) >= keep:
                break
            shown.append(_tokens(tokenizer, part.completion_ids[i], mask[i], moved_kl[i], silenced[i],
                                 logp_S[i], logp_T[i], logq[i]))
    return tally.result(), shown


def _tokens(tokenizer, ids, mask, moved, silenced, logp_S, logp_T, logq) -> list[dict]:
    """One attempt, token by token, for the HTML view."""
    return [_token(tokenizer, ids[t], moved[t], silenced[t], logp_S[t], logp_T[t], logq[t])
            for t in range(int(mask.sum().item()))]


def _token(tokenizer, token, moved, silenced, logp_S, logp_T, logq) -> dict:
    """One position of an attempt: its text, how far the aggregate moves the student there, whether
    the gate silences it, and the student's, the teacher's and the target's most likely tokens."""
    row = {"text": tokenizer.decode([int(token)]), "moved": round(float(moved), 4), "silenced": bool(silenced > 0)}
    for name, lp in (("student", logp_S), ("teacher", logp_T), ("target", logq)):
        p, idx = lp.exp().topk(TOP)
        row[name] = [[tokenizer.decode([int(j)]), round(float(v), 3)] for v, j in zip(p, idx)]
    return row


class _Movement:
    """The aggregate's statistics over attempts, one position at a time (what aggregate_stats
    computes from whole sequences), and the first `keep` attempts token by token."""

    def __init__(self, tokenizer, rule, gate: str, gate_prob: float, intervene_kl: float, keep: int):
        self.tokenizer, self.rule, self.gate, self.gate_prob = tokenizer, rule, gate, gate_prob
        self.tally, self.keep, self.shown = _Tally(intervene_kl), keep, []

    def begin(self, rows: int, device=None) -> None:
        """A new chunk of `rows` attempts: the gate's memory starts over, and the first ones are drawn
        token by token while fewer than `keep` have been."""
        self.off = torch.zeros(rows, dtype=torch.bool, device=device)  # the teacher has already left this attempt
        self.drawn = [[] for _ in range(min(self.keep - len(self.shown), rows))]
        self.shown += self.drawn

    def add(self, logp_S, logp_T, teacher, tokens, alive, which) -> None:
        """One position of the attempts `which` (their indices in the chunk): the student's and the
        teacher's log-probs (rows, V), the teacher the rule reads (the counterfactual one, or
        logp_T), the tokens sampled there and which attempts had not stopped before it."""
        logq = self.rule(logp_S[:, None], teacher[:, None], None)[:, 0]
        raw, moved = kl_div(logp_T, logp_S), kl_div(logq, logp_S)
        kept = alive
        if self.gate != "none":  # until_divergence, a position at a time
            left = (logp_T.gather(-1, tokens[:, None]).squeeze(-1) < math.log(self.gate_prob)) & alive
            kept = alive & ~self.off[which] & (left if self.gate == "point" else True)
            self.off[which] |= left
        silenced = (alive & ~kept).float()
        self.tally.add(raw, moved, alive.float(), silenced)
        for r, i in enumerate(which.tolist()):
            if i < len(self.drawn) and alive[r]:
                self.drawn[i].append(_token(self.tokenizer, tokens[r], moved[r], silenced[r], logp_S[r], logp_T[r],
                                            logq[r]))



@torch.inference_mode()
def joint_passes(model, tokenizer, greedy: dict[str, list[list[int]]], movements: dict, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int, row_offset: int, global_rows: int) -> dict[str, list[str]]:
    """Every pass of the probe over one chunk of records in one decoding loop (Llama-family models:
    decoder.LeanDecoder.shared). `greedy` maps a pass to its prompts, "student" and "teacher" and
    "shuffled" among them; besides their greedy rows, the student's prompts are decoded again at
    `temperature` (the attempts, with the noise `rollout.sample` would draw for these rows), and the
    teacher's and the shuffled prompts are fed the attempts' tokens, so that at every position the
    student's, the teacher's and the wrong-reference teacher's distributions over the attempt are
    at hand without encoding any prompt twice or any attempt again. `movements` maps
    None (the teacher as the rule reads it) or "counterfactual" to a _Movement to feed. Returns
    each greedy pass's texts and "attempts"."""
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    names = list(greedy) + ["attempts", "forced teacher", "forced shuffled"]
    dec = decoder.LeanDecoder.shared(model, list(greedy.values()) + [greedy["student"], greedy["teacher"],
                                                                       greedy["shuffled"]], max_new_tokens, pad)
    n = len(greedy["student"])
    rows = {k: slice(i * n, (i + 1) * n) for i, k in enumerate(names)}
    ends = stop_ids(tokenizer)
    stops = torch.tensor(ends, device=device)
    at = torch.arange(dec.logits.shape[0], device=device)  # each row's place in `names`' layout
    role = at // n  # which pass a row belongs to
    live = torch.ones_like(at, dtype=torch.bool)
    columns, logits = [], dec.logits
    for step in range(max_new_tokens):
        # rows of the attempts and of the teachers fed them, in attempt order (they stop together)
        A, T, C = ((role == names.index(k)).nonzero().squeeze(1) for k in ("attempts", "forced teacher", "forced shuffled"))
        which = at[A] - rows["attempts"].start
        tokens = logits.argmax(-1)
        noise = None
        if temperature > 0:
            noise = gumbel_noise((global_rows, logits.shape[-1]), seed, step,
                                 slice(row_offset, row_offset + n), device)[which]
        sampled = choose(logits[A], temperature, top_p, noise)[0]
        tokens[A], tokens[T], tokens[C] = sampled, sampled, sampled
        logp_S, logp_T, logp_C = (torch.log_softmax(logits[r], -1) for r in (A, T, C))
        for kind, movement in movements.items():
            movement.add(logp_S, logp_T, logp_T if kind is None else counterfactual(logp_T, logp_C, logp_S),
                         sampled, live[A], which)
        tokens.masked_fill_(~live, pad)
        columns.append(torch.full((len(names) * n,), pad, device=device).index_copy_(0, at, tokens))
        live &= ~torch.isin(tokens, stops)
        if not live.any():
            break
        if (~live).sum() * 4 >= len(live):  # a quarter of the rows have stopped: stop carrying them
            kept = live.nonzero().squeeze(1)
            dec.keep(kept)
            at, role, live, tokens = at[kept], role[kept], live[kept], tokens[kept]
        logits = dec.step(tokens)
    _, texts = completion_texts(tokenizer, torch.stack(columns, 1), ends)
    return {k: texts[rows[k]] for k in list(greedy) + ["attempts"]}


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


def probe(cfg, n: int = 64, html_attempts: int = 0, log=print, separate: bool = False) -> dict:
    """Probe `cfg.model` on `n` held-out records of `cfg.task` / `cfg.eval_data` / `cfg.data`, with
    `cfg`'s templates, generation length, hint (the teacher sees the reference, or with
    hint=answer only the answer), aggregation rule and gate (a TrainConfig: what training would
    use). Returns the figures, the verdict and, with `html_attempts`, that many attempts token
    by token. On Llama-family models every pass decodes in one loop (joint_passes), to float
    rounding what the passes one by one give (`separate`, and any other model), and faster; the
    counterfactual teacher reads the shuffled control's wrong references."""
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
    report = {"model": cfg.model, "data": cfg.eval_data or cfg.data, "task": None if cfg.data else (cfg.task or "chain"),
              "n": len(records), "max_new_tokens": cfg.max_new_tokens}
    passes = {"student": (records, "none"), "teacher": (records, cfg.hint), "shuffled": (others, "solution"),
              "answer_only": (records, "answer")}  # each greedy pass: its records and what the prompt shows
    prompts = {k: prompt_ids(tok, recs, tpl, hint) for k, (recs, hint) in passes.items()}
    joint = decoder.LEAN and decoder.supported(model) and not separate
    if joint:  # every pass in one decoding loop per chunk of records
        # counterfactual=auto is resolved below, from the greedy passes of this same loop: measure both
        kinds = ([None] if cfg.counterfactual in ("none", "auto") else []) + (
            ["counterfactual"] if cfg.counterfactual != "none" else [])
        movements = {k: _Movement(tok, cfg.aggregation_rule(), cfg.gate, cfg.gate_prob, cfg.intervene_kl,
                                  html_attempts) for k in kinds}
        texts = {k: [] for k in prompts}
        for start in range(0, len(records), CHUNK):
            chunk = {k: ids[start:start + CHUNK] for k, ids in prompts.items()}
            for m in movements.values():
                m.begin(len(chunk["student"]), next(model.parameters()).device)
            out = joint_passes(model, tok, chunk, movements, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                               cfg.seed, start, len(records))
            for k in texts:
                texts[k] += out[k]
    for key, (recs, hint) in passes.items():
        if joint:
            report[key] = _greedy_scores(texts[key], recs, task)
        else:
            report[key] = _scores(evaluate(model, tok, tpl, recs, hint=hint, task=task, samples=0,
                                           max_new_tokens=cfg.max_new_tokens))
        log(f"probe: {key:<11} pass@1 {report[key]['strict']:.1%} strict, {report[key]['lenient']:.1%} lenient, "
            f"leak {report[key]['leak']:.1%}")
    counterfactual = cfg.counterfactual
    if counterfactual == "auto":  # as training resolves it (train.resolve_counterfactual), on these records
        on = states_answers_first(report["teacher"]["leak"], report["student"]["leak"], len(records))
        counterfactual = "shuffled" if on else "none"
    if joint:
        movement = movements["counterfactual" if counterfactual != "none" else None]
        report["aggregate"], shown = movement.tally.result(), movement.shown
    else:
        attempts = sample(model, tok, prompts["student"], max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids(tok),
                          temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
        report["aggregate"], shown = aggregate_stats(
            model, tok, prompts["student"], prompts["teacher"], attempts, cfg.aggregation_rule(), cfg.gate,
            cfg.gate_prob, cfg.intervene_kl, keep=html_attempts,
            counter_ids=prompts["shuffled"] if counterfactual != "none" else None)
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
