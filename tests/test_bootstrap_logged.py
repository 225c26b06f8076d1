"""Answer-only bootstrapping and logged conversations (issue 5, parts 2 and 3)."""

import json
import os

import pytest
import torch

import handrail.commands.bootstrap
import handrail.commands.train
from handrail.config import build
from handrail.data.records import DataError
from handrail.data.datafile import load_records
from handrail.runtime.evaluate import is_correct, is_leak
from handrail.engine.rollout import Rollout
from handrail.data.tasks import get_task
from handrail.commands.train import TrainConfig, train

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "conversations.jsonl")
QUIET = dict(log=lambda *_: None)


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def write_jsonl(path, rows_):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return str(path)


# -- logged conversations ------------------------------------------------------------------------
def test_example_conversations_expand_into_one_record_per_assistant_turn():
    recs = load_records(EXAMPLES)
    assert len(recs) == 5  # 2 + 2 + 1 assistant turns up to each accepted one
    first, second = recs[0], recs[1]
    assert first.prompt[-1]["role"] == "user" and len(first.prompt) == 1
    assert first.completion.startswith("def fib(n):\n    if n < 2")
    assert second.completion == second.solution  # the accepted turn itself
    assert first.solution == second.solution and "a, b = b, a + b" in first.solution
    assert recs[3].answer == "408" and recs[2].prompt[0]["role"] == "system"


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "accepted": True},
      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "accepted": True}],
     r"field 'messages': expected exactly one turn .* found 2"),
    ([{"role": "user", "content": "q", "accepted": True}, {"role": "assistant", "content": "a"}],
     r"field 'messages\[0\].accepted': only an assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "accepted": "yes"}],
     r"field 'messages\[1\].accepted': expected true or false"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a", "accepted": True}],
     r"field 'messages\[0\]': an assistant turn must follow a user turn"),
])
def test_bad_conversations_name_line_and_field(tmp_path, messages, error):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "accepted": True}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError, match=r"c.jsonl:2: " + error):
        load_records(path)


def task_conversations(tmp_path, n=24):
    """Conversations on the embedded task: a wrong first attempt, a nudge, the accepted solution."""
    problems = get_task("chain").split("train", n, 2, seed=5)
    convs = [{"messages": [{"role": "user", "content": p.prompt},
                           {"role": "assistant", "content": f"#### {int(p.answer) + 1}"},
                           {"role": "user", "content": "show the steps"},
                           {"role": "assistant", "content": p.solution, "accepted": True}],
              "answer": p.answer} for p in problems]
    return write_jsonl(tmp_path / "conv.jsonl", convs)


def test_logged_conversations_train_without_generating(tiny_model, tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("logged conversations must not sample")

    monkeypatch.setattr(handrail.commands.train, "sample", no_sampling)
    data = task_conversations(tmp_path)
    cfg = TrainConfig(model=tiny_model, out=str(tmp_path / "run"), data=data, rollouts=32, prompts_per_step=8,
                      lr=1e-3, eval_every=0, checkpoint_every=0)
    summary = train(cfg, **QUIET)
    log = rows(tmp_path / "run")
    assert json.load(open(tmp_path / "run" / "config.json"))["rollout"] == "logged"
    assert summary["rollouts"] == 0 and summary["step"] == 4
    assert log[-1]["tokens"] > 0 and log[-1]["teacher/raw_kl"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in log)


def test_logged_conversations_refuse_methods_that_need_fresh_samples(tiny_model, tmp_path):
    data = task_conversations(tmp_path)
    with pytest.raises(ValueError, match="logged conversations train with method self-distill"):
        train(TrainConfig(model=tiny_model, out=str(tmp_path / "g"), data=data, method="grpo"), **QUIET)
    with pytest.raises(ValueError, match="48 training records, fewer than prompts_per_step=64"):
        train(TrainConfig(model=tiny_model, out=str(tmp_path / "p"), data=data, prompts_per_step=64), **QUIET)
    with pytest.raises(ValueError, match="rollout': logged needs logged-conversation records"):
        train(TrainConfig(model=tiny_model, out=str(tmp_path / "t"), rollout="logged", level=2), **QUIET)


# -- answer-only bootstrap -----------------------------------------------------------------------
def answer_only(tmp_path, n=40):
    problems = get_task("chain").split("train", n, 2, seed=3)
    solutions = {p.prompt: p.solution for p in problems}
    return write_jsonl(tmp_path / "answers.jsonl", [{"prompt": p.prompt, "answer": p.answer} for p in problems]), solutions


def fake_sampler(solutions):
    """Stands in for the model: even global rows write the true worked solution, odd rows state
    the right answer with no work (a leak, which the bootstrap must reject)."""
    def sample(model, tokenizer, prompt_ids, *, row_offset=0, **kw):
        texts = []
        for i, ids in enumerate(prompt_ids):
            sol = solutions[tokenizer.decode(ids).strip()]
            texts.append(sol if (row_offset + i) % 2 == 0 else sol.splitlines()[-1])
        return Rollout(prompt_ids, None, None, None, texts)
    return sample


def test_bootstrap_keeps_verified_stepwise_solutions_and_counts_its_samples(tiny_model, tmp_path, monkeypatch):
    data, solutions = answer_only(tmp_path)
    monkeypatch.setattr(handrail.commands.bootstrap, "sample", fake_sampler(solutions))
    out = tmp_path / "run"
    cfg = TrainConfig(model=tiny_model, out=str(out), data=data, eval_data=data, eval_n=8, bootstrap_k=2,
                      bootstrap_rollouts=32, rollouts=64, prompts_per_step=8, max_new_tokens=24, lr=1e-3,
                      eval_every=2, checkpoint_every=2)
    summary = train(cfg, **QUIET)
    kept = handrail.commands.bootstrap.load(out / "bootstrap.jsonl")
    # 32 samples = 16 problems x k=2; the worked solution (row 0 of each pair) is kept, the leak is not
    assert len(kept) == 16 and all(r.solution == solutions[r.prompt] for r in kept)
    log = rows(out)
    boot = next(r for r in log if "bootstrap/solved" in r)
    assert (boot["bootstrap/rollouts"], boot["bootstrap/problems"], boot["bootstrap/solved"]) == (32, 16, 16)
    assert summary["rollouts"] == 64 and summary["step"] == 4  # (64 - 32) / 8 training steps
    assert log[-1]["bootstrap_rollouts"] == 32

    # resuming reads the kept solutions back instead of sampling again
    monkeypatch.setattr(handrail.commands.bootstrap, "sample", None)
    train(build(TrainConfig, out / "config.json", ["rollouts=80"]), resume=True, **QUIET)
    assert rows(out)[-1]["step"] == 6 and rows(out)[-1]["rollouts"] == 80


def test_bootstrap_with_guided_samples_runs_on_a_real_model(tiny_model, tmp_path):
    data, _ = answer_only(tmp_path, n=16)
    cfg = TrainConfig(model=tiny_model, out=str(tmp_path / "run"), data=data, bootstrap_k=2, bootstrap_rollout="guided",
                      bootstrap_rollouts=32, rollouts=48, prompts_per_step=8, max_new_tokens=24, eval_every=0)
    try:
        train(cfg, **QUIET)
        solved = True
    except ValueError as e:  # the 30-step fixture model may solve nothing; then it must say so clearly
        assert "bootstrap solved none of the answer-only problems" in str(e)
        solved = False
    boot = next(r for r in rows(tmp_path / "run") if "bootstrap/solved" in r)
    assert boot["bootstrap/rollouts"] == 32 and boot["bootstrap/problems"] == 16
    assert (boot["bootstrap/solved"] > 0) == solved
    if solved:  # whatever it kept must verify and not answer first (a data file's definitions)
        kept = handrail.commands.bootstrap.load(tmp_path / "run" / "bootstrap.jsonl")
        assert len(kept) == boot["bootstrap/solved"]
        assert all(is_correct(r.solution, r, None) and not is_leak(r.solution, r, None) for r in kept)


def test_bootstrap_must_leave_budget_for_training(tiny_model):
    with pytest.raises(ValueError, match="bootstrap_rollouts': 64 leaves nothing"):
        build(TrainConfig, overrides=dict(model=tiny_model, bootstrap_k=2, bootstrap_rollouts=64, rollouts=64))


def test_a_long_conversation_is_cut_from_its_earliest_turns_when_asked(tiny_model):
    from handrail.data.records import Record
    from handrail.runtime.evaluate import PromptIds, fit_records
    from handrail.runtime.models import load_model

    _, tok, templates = load_model(tiny_model)
    long = Record(prompt=[{"role": "user", "content": "12+3+4+5+6+7+8+9"},
                          {"role": "assistant", "content": "12+3=15\n" * 20 + "#### 99"},
                          {"role": "user", "content": "99 is not right. Check each step."}],
                  solution="#### 54", source="c.jsonl:1 (turn 3)", completion="#### 54")
    n = len(PromptIds(tok, templates)([long], "solution")[0])
    limit = n - 50
    with pytest.raises(DataError, match=r"c.jsonl:1 \(turn 3\): field 'prompt'.*truncate=left"):
        fit_records(tok, [long], templates, limit, "error")
    cut = fit_records(tok, [long], templates, limit, "left")[0]
    ids = PromptIds(tok, templates)
    assert max(len(ids([cut], h)[0]) for h in ("none", "solution")) <= limit
    assert cut.prompt[-1] == long.prompt[-1]  # the turn the template wraps is whole
    assert cut.prompt[-2]["content"].endswith("#### 99")  # the attempt's end is kept, its start cut
    assert len(cut.prompt[-2]["content"]) < len(long.prompt[1]["content"])
