"""The compare harness and the quick demo, as subprocesses with tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handrail.commands.compare import efficiency_ratio, mean_curve, samples_to_reach


def run(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "handrail.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_compare_writes_results_plot_and_table(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    p = run("compare", "--model", tiny_model, "--methods", "self-distill,grpo,sft,self-distill:none:guided",
            "--rollouts", "32", "--seeds", "2", "--out", str(out), "samples_per_step=8", "eval_points=2",
            "train=eval_n=8,max_new_tokens=24,level=2,train_n=64")
    res = json.loads((out / "results.json").read_text())["scenarios"]["full"]
    assert set(res["methods"]) == {"self-distill", "grpo", "sft", "self-distill:none:guided"}
    for r in res["methods"].values():
        assert len(r["runs"]) == 2
        assert [pt["samples"] for pt in r["runs"][0]["curve"]] == [0, 16, 32]  # same points for all
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "sample-efficiency ratio" in p.stdout and "| grpo |" in (out / "table.md").read_text()


def test_compare_on_a_user_jsonl_task(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "solution": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n"
                            for a in range(10, 14) for b in range(1, 5)))
    out = tmp_path / "cmp"
    run("compare", "--model", tiny_model, "--data", str(data), "--methods", "self-distill,sft", "--rollouts", "16",
        "--seeds", "1", "--out", str(out), "samples_per_step=8", "eval_points=1",
        f"train=eval_data={data},max_new_tokens=16")
    res = json.loads((out / "results.json").read_text())["scenarios"]["full"]
    assert res["methods"]["sft"]["runs"][0]["curve"][-1]["samples"] == 16


def test_compare_runs_each_scenario_and_records_what_reproduces_it(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    p = run("compare", "--model", tiny_model, "--methods", "self-distill:considered,sft", "--rollouts", "16",
            "--seeds", "1", "--out", str(out), "samples_per_step=8", "eval_points=1",
            "scenarios=full,terse,answer,hard,terse-shuffled,noref",
            "train=eval_n=8,max_new_tokens=24,level=2,train_n=64,bootstrap_k=0")
    res = json.loads((out / "results.json").read_text())["scenarios"]
    assert list(res) == ["full", "terse", "answer", "hard", "terse-shuffled", "noref"]
    cfgs = {name: json.loads((out / name / "sft-s0" / "config.json").read_text()) for name in res}
    assert cfgs["terse"]["reference"] == "terse" and cfgs["answer"]["reference"] == "answer"
    assert cfgs["hard"]["level"] == 2  # an explicit level in train= wins over the scenario's
    # the controls: another problem's (terse) reference; the teacher's prompt with none
    assert cfgs["terse-shuffled"]["shuffle_references"] and cfgs["terse-shuffled"]["reference"] == "terse"
    assert cfgs["noref"]["hint"] == "blank" and not cfgs["full"]["shuffle_references"]
    assert p.stdout.count("### scenario:") == 6
    assert "| lenient end |" in (out / "table.md").read_text()
    env = json.loads((out / "environment.json").read_text())
    assert env["cpu_capability"] and env["torch"] and "base_pretrain_result" in env
    bad = subprocess.run([sys.executable, "-m", "handrail.cli", "compare", "--model", tiny_model, "--out",
                          str(tmp_path / "bad"), "--methods", "sft,nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nonsense" in bad.stderr and not (tmp_path / "bad").exists()
    bad = subprocess.run([sys.executable, "-m", "handrail.cli", "compare", "--model", tiny_model, "--out",
                          str(tmp_path / "bad"), "--methods", "sft", "ratio=sft-grpo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "config key 'ratio'" in bad.stderr and not (tmp_path / "bad").exists()


def test_compare_sweeps_on_the_validation_split_and_runs_each_method_at_its_best(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    p = run("compare", "--model", tiny_model, "--methods", "sft,grpo,grpo+curriculum=brevity", "--rollouts", "16",
            "--seeds", "1", "--out", str(out), "samples_per_step=8", "eval_points=1", "sweep=lr=1e-5,3e-3",
            "train=eval_n=8,max_new_tokens=24,level=2,train_n=64,curriculum_n=8")
    sweep = json.loads((out / "results.json").read_text())["sweep"]["full"]
    curriculum = json.loads((out / "sweep" / "full" / "grpo+curriculum=brevity-lr1e-5-s0" / "config.json").read_text())
    assert curriculum["curriculum"] == "brevity" and curriculum["eval_every"] > 0  # its checks are kept
    for spec in ("sft", "grpo"):
        scores = sweep[spec]["validation_pass@1"]
        assert set(scores) == {"1e-5", "3e-3"} and sweep[spec]["key"] == "lr"
        assert scores[sweep[spec]["chosen"]] == max(scores.values())
        main_run = json.loads((out / f"{spec}-s0" / "config.json").read_text())
        assert main_run["lr"] == float(sweep[spec]["chosen"]) and main_run["eval_split"] == "test"
        tried = json.loads((out / "sweep" / "full" / f"{spec}-lr3e-3-s0" / "config.json").read_text())
        assert tried["eval_split"] == "validation" and tried["seed"] != main_run["seed"]
    assert "chosen on the validation split: sft lr=" in p.stdout


def test_compare_counts_vine_branches_as_samples(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    run("compare", "--model", tiny_model, "--methods", "vine", "--rollouts", "40", "--seeds", "1", "--out", str(out),
        "samples_per_step=8", "group_size=4", "eval_points=2", "train=eval_n=4,max_new_tokens=16,level=2,train_n=32")
    curve = json.loads((out / "results.json").read_text())["scenarios"]["full"]["methods"]["vine"]["runs"][0]["curve"]
    # 2 prompts a step, each with 1 + 2 x 2 rollouts: 10 a step, 4 steps, evaluated every 2
    assert [pt["samples"] for pt in curve] == [0, 20, 40]


def test_validation_problems_are_never_test_problems():
    from handrail.data.tasks import get_task

    task = get_task("chain")
    test = {q.prompt for q in task.split("test", 200, 4)}
    val = [q.prompt for q in task.split("validation", 200, 4)]
    assert len(set(val)) == 200 and not test & set(val)


def test_quick_demo(tmp_path):
    """Also: its log, written to a file as a scheduler would, is whole lines a person can read."""
    log = tmp_path / "demo.log"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "handrail.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                           stdout=f, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "HANDRAIL_CACHE": str(tmp_path / "cache")})
    text = log.read_text()
    assert p.returncode == 0, text[-3000:]
    assert "| self-distill |" in text and "plot:" in text
    assert (tmp_path / "demo" / "accuracy.png").exists()
    assert "\r" not in text and "\x1b" not in text and "\n\n\n" not in text


def test_efficiency_ratio_cases():
    def one(curve):
        return {"mean": [(i * 16, v, 0) for i, v in enumerate(curve)],
                "runs": [{"curve": [{"samples": i * 16, "pass@1": v, "seconds": i * 2.0} for i, v in enumerate(curve)]}]}

    def res(g, s):
        return {"grpo": one(g), "self-distill": one(s)}

    r = efficiency_ratio(res([0.1, 0.2, 0.3, 0.4], [0.1, 0.4, 0.4, 0.5]))
    assert r["ratio"] == 3.0 and r["per_seed"] == [3.0] and r["wall_clock_ratio"] == 3.0
    # reached at self-distillation's first evaluation, with GRPO's best at its last: a bound, said so
    assert r["lower_bound"] and r["baseline_still_rising"] and "at least" in r["message"]
    r = efficiency_ratio(res([0.1, 0.2, 0.4, 0.3, 0.3], [0.1, 0.2, 0.4, 0.5, 0.5]))
    assert r["ratio"] == 1.0 and not r["lower_bound"] and not r["baseline_still_rising"]
    # GRPO with a budget of its own (compare: grpo+rollouts=N) is found by its method name
    longer = {"grpo+rollouts=64": one([0.1, 0.2, 0.3, 0.4, 0.45]), "self-distill": one([0.1, 0.2, 0.5])}
    assert efficiency_ratio(longer)["ratio"] == 2.0
    assert efficiency_ratio(res([0.1, 0.2], [0.1, 0.15]))["ratio"] is None
    # the target is GRPO's best, not its last: a GRPO that peaks and falls still defines one
    assert efficiency_ratio(res([0.1, 0.3, 0.2], [0.1, 0.3, 0.4]))["ratio"] == 1.0
    assert efficiency_ratio(res([0.1, 0.05], [0.1, 0.4]))["method_rollouts"] == 0
    assert "never reached" in efficiency_ratio(res([0.1, 0.2], [0.1, 0.15]))["message"]
    assert samples_to_reach([(0, 0.1), (16, 0.3)], 0.3) == 16
    # the pair is the user's: SFT against GRPO, read from the same curves
    mixed = {"grpo": one([0.1, 0.2, 0.3, 0.4]), "sft": one([0.1, 0.2, 0.4, 0.4]), "self-distill": one([0.1, 0.4])}
    r = efficiency_ratio(mixed, "sft/grpo")
    assert r["ratio"] == 1.5 and r["method"] == "sft" and r["baseline"] == "grpo" and "sft at 32" in r["message"]
    assert efficiency_ratio(mixed, "")["message"] == ""
    assert "needs vine and grpo" in efficiency_ratio(mixed, "vine/grpo")["message"]


def test_a_method_spec_carries_its_own_keys_and_grouped_methods_get_groups():
    from handrail.commands.compare import CompareConfig, method_config

    c = CompareConfig(model="m", samples_per_step=16, group_size=4, train="lr=3e-4")
    plain = method_config(c, "self-distill:none+gate=none+lr=1e-5", 0, Path("o"))
    assert (plain.rule, plain.gate, plain.lr, plain.prompts_per_step) == ("none", "none", 1e-5, 16)
    for name in ("grpo", "rlsd", "srpo"):
        g = method_config(c, name, 0, Path("o"))
        assert (g.prompts_per_step, g.samples_per_prompt, g.lr) == (4, 4, 3e-4)
    with pytest.raises(ValueError, match="config key 'methods'"):
        method_config(c, "self-distill+gate", 0, Path("o"))
    with pytest.raises(ValueError, match="gate"):
        method_config(c, "self-distill+gate=sometimes", 0, Path("o"))


def test_mean_curve_aligns_runs_evaluated_at_different_sample_counts():
    """Runs of varying cost (expert iteration) are evaluated at different counts: each seed counts
    at its latest evaluation, so the mean never drops a seed's later points; equal grids are kept."""
    same = [[{"samples": s, "pass@1": v} for s, v in pts] for pts in ([(0, 0.1), (64, 0.5)], [(0, 0.3), (64, 0.7)])]
    assert mean_curve(same) == [(0, pytest.approx(0.2), pytest.approx(0.1)), (64, pytest.approx(0.6), pytest.approx(0.1))]
    ragged = [[{"samples": 0, "pass@1": 0.0}, {"samples": 40, "pass@1": 0.4}, {"samples": 90, "pass@1": 0.8}],
              [{"samples": 0, "pass@1": 0.2}, {"samples": 70, "pass@1": 0.6}]]
    got = {s: m for s, m, _ in mean_curve(ragged)}
    assert got == {0: pytest.approx(0.1), 40: pytest.approx(0.3), 70: pytest.approx(0.5), 90: pytest.approx(0.7)}
    assert max(got.values()) == pytest.approx((0.8 + 0.6) / 2)  # the best is the mean of both ends here


def test_train_keys_reach_the_methods_that_read_them_and_a_spec_key_must_be_read():
    """`train=` and a sweep apply to every method that reads the key; a method's own `+key=value`
    must be one it reads (an ignored option is refused, not silently dropped)."""
    from handrail.commands.compare import CompareConfig, method_config

    c = CompareConfig(model="m", samples_per_step=16, group_size=4, train="kl_coef=0.05,delta=0.5,lr=3e-4")
    sd, grpo = method_config(c, "self-distill", 0, Path("o")), method_config(c, "grpo", 0, Path("o"))
    assert (sd.delta, sd.kl_coef, sd.lr) == (0.5, 0.0, 3e-4)
    assert (grpo.delta, grpo.kl_coef, grpo.lr) == (1.0, 0.05, 3e-4)
    srpo = method_config(c, "srpo", 0, Path("o"))  # runs both, so reads both
    assert (srpo.delta, srpo.kl_coef) == (0.5, 0.05)
    swept = method_config(CompareConfig(model="m"), "grpo", 0, Path("o"), chosen={"gate_prob": "0.2", "lr": "1e-5"})
    assert (swept.gate_prob, swept.lr) == (0.05, 1e-5)
    with pytest.raises(ValueError, match="config key 'clip_eps': method self-distill does not read it"):
        method_config(c, "self-distill+clip_eps=0.3", 0, Path("o"))
