"""Steps: splitting, step ends on token ids, the embedded tasks' step checks, and the pure parts
of branching rollouts (branch points, Monte Carlo step advantages)."""

import pytest
import torch

from handrail.methods import branch_points, step_advantages
from handrail.engine.steps import delimiter_table, split_steps, step_ends
from handrail.data.tasks import get_task
from handrail.data.verifiers import FileTask


def test_split_steps_keeps_delimiters_and_a_last_open_step():
    assert split_steps("a=1\nb=2\n#### 3") == ["a=1\n", "b=2\n", "#### 3"]
    assert split_steps("a=1\n") == ["a=1\n"]
    assert split_steps("") == []
    assert split_steps("x; y; z", "; ") == ["x; ", "y; ", "z"]


def test_step_ends_on_token_ids(tiny_model):
    from handrail.runtime.models import load_model

    _, tok, _ = load_model(tiny_model)
    table = delimiter_table(tok)
    texts = ["12+3=15\n15-4=11\n#### 11", "#### 7"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, ids))
    comp = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T)
    for i, row in enumerate(ids):
        comp[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    ends = step_ends(comp, mask, table)
    # the tiny tokenizer is character-level: "12+3=15\n" is 8 tokens, then 8 more, then the rest and EOS
    assert ends == [[8, 16, len(ids[0])], [len(ids[1])]]


@pytest.mark.parametrize("prompt,previous,step,ok", [
    ("37+5-8", [], "37+5=42\n", True),
    ("37+5-8", [], "37+5-8=34\n", True),            # two operations in one line
    ("37+5-8", [], "37-8=29\n", False),             # chain: the prompt's order
    ("37+5-8", ["37+5=42\n"], "42-8=46\n", False),  # the misconception: wrong arithmetic
    ("37+5-8", ["37+5=42\n"], "41-8=33\n", False),  # not from the previous result
    ("37+5-8", ["37+5=42\n"], "#### 42", False),    # answered before the work is done
    ("37+5-8", ["37+5=42\n", "42-8=34\n"], "#### 34", True),
    ("37+5-8", ["37+5=42\n", "42-8=34\n", "#### 34\n"], "34+1=35", False),  # nothing after the answer
    ("37+5-8", [], "hello\n", False),
    ("sum 7 12 5", [], "12+5=17\n", True),          # sum: any order
    ("sum 7 12 5", [], "12+12=24\n", False),        # a number used twice
    ("sum 7 12 5", ["12+5=17\n"], "17+7=24\n", True),
])
def test_embedded_step_checks(prompt, previous, step, ok):
    task = get_task("sum" if prompt.startswith("sum") else "chain")
    assert task.step_valid(prompt, previous, step) is ok


def test_checked_accepts_every_reference_and_needs_no_answer():
    for name in ("chain", "sum"):
        task = get_task(name)
        for p in task.split("test", 30, level=4):
            assert task.checked(p.prompt, p.solution)
            assert task.checked(p.prompt, task.rewrite(p.solution, "terse"))
            assert not task.checked(p.prompt, p.solution.rsplit("\n", 1)[0])  # no final answer
    assert FileTask().checked is None
    assert FileTask().step_valid("q", [], "any line\n") and not FileTask().step_valid("q", ["#### 3\n"], "more")


def test_branch_points():
    assert branch_points([8, 16, 30], 2) == [0, 8]
    assert branch_points([8, 16, 24, 30], 3) == [0, 8, 16]
    assert branch_points([30], 3) == [0, 0, 0]   # one step: all continuations from the start
    assert branch_points([8, 30], 3) == [0, 0, 8]


def test_step_advantages_by_hand():
    # values: 0.5 at the start, 1.0 after token 4, 0.0 after token 7; the rollout failed (reward 0), length 9
    adv = step_advantages([0, 4, 7], [0.5, 1.0, 0.0], length=9, reward=0.0, T=10)
    assert adv.tolist() == [0.5] * 4 + [-1.0] * 3 + [0.0] * 2 + [0.0]
    # a repeated point is one value, the mean of its estimates
    adv = step_advantages([0, 0, 5], [1.0, 0.0, 1.0], length=6, reward=1.0, T=6)
    assert adv.tolist() == [0.5] * 5 + [0.0]


def test_vine_values_are_means_of_their_continuations(tiny_model, monkeypatch):
    """Every continuation solves the problem (a stand-in sampler): each branch point's value is 1,
    so a failed one-line rollout, branched only at its start (twice), gets advantage exactly -1
    on its tokens, and a solved multi-line one gets 0 everywhere."""
    import handrail.engine.rollout as R
    from handrail.data.records import records_from_task
    from handrail.runtime.evaluate import prompt_ids
    from handrail.methods import Vine, World
    from handrail.runtime.models import load_model
    from handrail.engine.rollout import given_rollout
    from handrail.commands.train import TrainConfig

    lm, tok, templates = load_model(tiny_model)
    task = get_task("chain")
    rec = records_from_task(task.split("train", 1, level=2))[0]

    def solve(model, tokenizer, prefixes, **kw):  # continuations that finish the reference solution
        return given_rollout(tokenizer, prefixes, [rec.solution] * len(prefixes))

    monkeypatch.setattr(R, "sample", solve)
    cfg = TrainConfig(model=tiny_model, method="vine", vine_points=3, vine_k=2, max_new_tokens=64)
    vine = Vine(cfg, lm, tok, templates, task)
    recs = [rec, rec]
    rollout = given_rollout(tok, prompt_ids(tok, recs, templates), ["#### 0", rec.solution])
    signal = vine.score(recs, rollout, lm, World())
    m = rollout.completion_mask > 0
    assert torch.equal(signal.adv[0][m[0]], torch.full((int(m[0].sum()),), -1.0))
    assert signal.adv[1].abs().sum() == 0
