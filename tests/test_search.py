"""Step-level search: pUCT selection and priors by hand, the tree on a scripted model whose
every step is right only 30% of the time, and the command on a tiny model."""

import json
import math
import random

import pytest

from handrail.cli import main
from handrail.data.records import Record
from handrail.methods.search import Node, Problem, SearchConfig, Searcher, priors_from_logps, puct_index
from handrail.data.tasks import get_task


def test_puct_by_hand():
    # nothing visited: the prior alone decides
    assert puct_index([0.5, 0.3, 0.2], [0, 0, 0], [0, 0, 0], 1.0) == 0
    # child 0 visited twice with value 0: 0.5*sqrt(3)/3 = 0.289 < 0.3*sqrt(3) = 0.520 for child 1
    assert puct_index([0.5, 0.3, 0.2], [2, 0, 0], [0, 0, 0], 1.0) == 1
    # ... but with mean value 1 it stays ahead: 1.289 > 0.520
    assert puct_index([0.5, 0.3, 0.2], [2, 0, 0], [2, 0, 0], 1.0) == 0
    # c_puct 0: pure exploitation of the mean value
    assert puct_index([0.9, 0.1], [5, 1], [1, 1], 0.0) == 1
    assert priors_from_logps([math.log(0.2), math.log(0.6)]) == pytest.approx([0.25, 0.75])


class _Chars:
    """Characters as token ids; 0 is the end of a completion."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def _scripted(task, prompt, p_right, rng):
    """A stand-in for the model: each next step is right with probability p_right, otherwise the
    student's misconception-like slip (the right result + 1); a rollout continues wrongly."""

    def sample(prefixes, budget, stops):
        rows = []
        for ids in prefixes:
            done = _Chars().decode(ids)
            steps = [s for s in done.split("\n") if s]
            state = task._replay(prompt, [s + "\n" for s in steps])
            acc, todo = state[0], state[1]
            lines = []
            while True:
                if not todo:
                    lines.append(f"#### {acc}")
                    break
                op, v = todo[0]
                right = acc + v if op == "+" else acc - v
                value = right if rng.random() < p_right else right + 1
                lines.append(f"{acc}{op}{v}={value}")
                acc, todo = value, todo[1:]
                if 10 in stops:  # step mode: one line
                    break
            text = "\n".join(lines) + ("\n" if 10 in stops and not lines[-1].startswith("#") else "")
            ids_out = [ord(c) for c in text] + ([] if text.endswith("\n") else [0])
            rows.append((ids_out, math.log(p_right)))
        return rows
    return sample


def test_search_finds_what_whole_samples_rarely_do():
    task, prompt = get_task("chain"), "37+5-8+6"   # three steps and an answer line
    s = Searcher.__new__(Searcher)
    s.tok, s.task, s.cfg = _Chars(), task, SearchConfig(simulations=16, candidates=2, max_new_tokens=96)
    s.stops, s.step_stops = [0], [0, 10]
    s._sample = _scripted(task, prompt, 0.3, random.Random(0))
    p = Problem(Record(prompt, answer="40"), [])
    for _ in range(64):
        s.simulate([p])
        if p.solution:
            break
    assert p.solution == "37+5=42\n42-8=34\n34+6=40\n#### 40"
    assert p.root.visits > 0 and all(task.step_valid(prompt, [], c.tokens and _Chars().decode(c.tokens))
                                     for c in p.root.children)   # invalid steps were pruned
    # whole samples at the same odds: all three steps right has probability 0.3^3 = 2.7%


def test_node_reopens_while_every_child_is_a_dead_end():
    n = Node([])
    assert n.open()
    n.children = [Node([1], terminal=True, value=0.0)]
    assert n.open()
    n.children.append(Node([2]))
    assert not n.open()


def test_search_command_on_a_tiny_model(tiny_model, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    assert main(["search", "--model", tiny_model, "--n", "4", "--level", "2", "--simulations", "2",
                 "--candidates", "2", "--max-new-tokens", "24", "--json", "--out", str(rows)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "search" and 0 <= out["accuracy"] <= 1 and out["n"] == 4 and out["tokens_per_problem"] > 0
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert len(lines) == 4 and all({"completion", "correct", "tokens"} <= set(x) for x in lines)
    assert main(["search", "--model", tiny_model, "--n", "4", "--level", "2", "--best-of", "2",
                 "--max-new-tokens", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "best-of-2" and out["tokens_per_problem"] > 0


def test_search_check_needs_a_program_check(tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    assert main(["search", "--model", tiny_model, "--data", str(data), "--value", "check", "--n", "1"]) == 2
    assert "--value: check needs a task with a program check" in capsys.readouterr().err
