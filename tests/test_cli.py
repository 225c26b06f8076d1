"""Subprocess smoke runs of each command, with tiny sizes, as a user would type them."""

import json
import os
import subprocess
import sys
import time

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def handrail(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "handrail.cli", *args], capture_output=True, text=True, env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_pretrain_then_eval_json(tmp_path):
    out = tmp_path / "m"
    t0 = time.time()
    p = handrail("pretrain", "--task", "sum", "--out", str(out), "max_steps=10", "d_model=32",
                 "n_layers=1", "n_problems=200", "eval_n=8")
    took = time.time() - t0
    assert "student pass@1" in p.stdout and "teacher pass@1" in p.stdout
    # no terminal: the bar writes a whole line now and then (its start, its end, and one in 20-30 s
    # on a machine slow enough), not a redraw per step
    assert 1 <= p.stderr.count("pretrain:") <= 3 + took / 20 and "\r" not in p.stderr, p.stderr
    assert (out / "config.json").exists() and (out / "handrail.json").exists()
    # a 10-step model is far from the lab's band: the build says so, and what to change
    result = json.loads((out / "pretrain_result.json").read_text())
    assert result["band"]["ok"] is False and "raise max_steps" in result["band"]["message"]
    assert "WARNING: the teacher (shown the full reference) solves only" in p.stdout
    recipe = json.loads((out / "pretrain_config.json").read_text())
    assert recipe["task"] == "sum" and "out" not in recipe  # shareable: no machine's paths
    res = json.loads(handrail("eval", "--model", str(out), "--task", "sum", "--n", "8",
                              "--samples", "2", "--json", "--completions", str(tmp_path / "c.jsonl")).stdout)
    assert {"accuracy", "accuracy_sampled", "leak_rate", "n"} <= set(res) and res["n"] == 8
    # the greedy completions behind those figures, one line per problem
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"problem", "completion", "correct", "leak", "answer"} <= set(r) for r in rows)
    assert sum(r["correct"] for r in rows) / 8 == res["accuracy"] and sum(r["leak"] for r in rows) / 8 == res["leak_rate"]
    p = handrail("eval", "--model", str(out), "--task", "sum", "--n", "8", "--completions", str(tmp_path), check=False)
    assert p.returncode == 2 and "--completions" in p.stderr and "is a folder" in p.stderr


def test_pretrain_on_a_data_file_checks_answers(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"double {i}", "solution": f"{i}*2={2 * i}\n#### {2 * i}"}) + "\n"
                            for i in range(40)))
    out = tmp_path / "m"
    data.write_text(data.read_text() + "".join(
        json.dumps({"prompt": f"quadruple {i}", "solution": f"{i}*2={2 * i}\n{2 * i}*2={4 * i}\n#### {4 * i}"}) + "\n"
        for i in range(20)))
    p = handrail("pretrain", "--data", str(data), "--out", str(out), "max_steps=5", "d_model=32", "n_layers=1")
    assert "18 of 58 records, those with at least 3 solution lines, are shown only with a hint" in p.stdout + p.stderr
    res = json.loads(handrail("eval", "--model", str(out), "--data", str(data), "--samples", "0", "--json").stdout)
    assert res["n"] == 60 and res["accuracy_sampled"] is None
    assert json.loads((out / "pretrain_result.json").read_text())["eval_n"] == 2  # held out of the hard part


def test_bad_data_is_one_line_exit_2(tmp_path, tiny_model):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    p = handrail("eval", "--model", tiny_model, "--data", str(data), check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl:2: field 'solution'" in lines[0] and "Traceback" not in p.stderr


def test_bad_config_key_and_missing_model_exit_2(tmp_path, tiny_model):
    p = handrail("train", "--model", tiny_model, "--out", str(tmp_path / "r"), "nonsense=1", check=False)
    assert p.returncode == 2 and "unknown config key 'nonsense'" in p.stderr
    p = handrail("eval", "--model", str(tmp_path / "nowhere.gguf"), check=False)
    assert p.returncode == 2 and "nowhere.gguf" in p.stderr and "Traceback" not in p.stderr


def test_decode_prints_student_and_guided(tiny_model):
    p = handrail("decode", "--model", tiny_model, "--rule", "none", "--level", "2", "--max-new-tokens", "40")
    assert "problem:" in p.stdout and "--- student" in p.stdout and "--- guided (none)" in p.stdout
    p = handrail("decode", "--model", tiny_model, "--prompt", "12+3", "--solution", "12+3=15\n#### 15")
    assert "--- guided (trust-region)" in p.stdout
    assert handrail("decode", "--model", tiny_model, "--prompt", "x", check=False).returncode == 2


def test_key_value_overrides_may_come_anywhere_on_the_line():
    from handrail.cli import parse

    a = parse(["train", "--model", "m", "lr=1e-3", "--method", "grpo", "samples_per_prompt=4", "--rollouts", "64"])
    assert a.method == "grpo" and a.rollouts == 64 and a.overrides == ["lr=1e-3", "samples_per_prompt=4"]
    for argv in (["train", "--model", "m", "lr=1e-3", "--bogus"], ["train", "--model", "m", "lr=1e-3", "--method", "grpo", "stray"],
                 ["demo", "lr=1e-3"]):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2


def test_a_users_mistake_is_exit_2_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import handrail.cli as cli
    from handrail.errors import UsageError

    def fails(error):
        def fn(a):
            raise error
        return fn

    real = cli.parse
    monkeypatch.setattr(cli, "parse", lambda argv: (lambda a: (setattr(a, "fn", fn_now[0]), a)[1])(real(argv)))
    fn_now = [fails(UsageError("config key 'x': no good"))]
    assert cli.main(["eval", "--model", "m"]) == 2
    assert capsys.readouterr().err.strip() == "handrail eval: error: config key 'x': no good"
    fn_now[0] = fails(ValueError("a bug's message"))  # not the user's mistake: not turned into one
    with pytest.raises(ValueError, match="a bug's message"):
        cli.main(["eval", "--model", "m"])
