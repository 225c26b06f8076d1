"""train()'s parts, each alone: the budget, the checkpoints, the parallel strategy, one step."""

import json
import math

import pytest
import torch

from handrail.engine.budget import Budget
from handrail.runtime.checkpoint import Checkpoints, NonFinite, State
from handrail.commands.train import TrainConfig


# -- budget --------------------------------------------------------------------------------------
def test_budget_counts_bootstrap_and_a_varying_cost():
    b = Budget(total=100, per_step=16, sampling=True)
    s = State()
    assert b.steps(s) == 6 and b.left(s)
    s.rollouts = s.bootstrap_rollouts = 50  # a bootstrap stage spent half
    assert b.steps(s) == 3
    for _ in range(3):
        s.step += 1
        b.spend(s, None)
    assert s.rollouts == 98 and not b.left(s) and b.samples(s) == 98
    # a search's cost is what it reports; the budget ends the run once spent, whatever the steps
    v, s = Budget(total=100, per_step=4, sampling=False), State()
    s.step = 1
    v.spend(s, 120)
    assert s.rollouts == 120 and not v.left(s)


def test_budget_charges_examples_for_a_method_that_samples_nothing():
    b, s = Budget(total=64, per_step=16, sampling=False), State()
    s.step = 2
    b.spend(s, None)
    assert s.rollouts == 0 and b.samples(s) == 32  # SFT: two steps of 16 references


def test_budget_from_a_config():
    from handrail.methods import METHODS

    c = TrainConfig(model="m", method="vine", prompts_per_step=4, vine_points=2, vine_k=2, rollouts=100)
    b = Budget.of(c, METHODS["vine"])
    assert b.per_step == 4 * (1 + 2 * 2) and b.sampling
    assert not Budget.of(TrainConfig(model="m", method="sft"), METHODS["sft"]).sampling


# -- checkpoints ---------------------------------------------------------------------------------
class _Method:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": torch.tensor(self.value)}

    def load_state_dict(self, state):
        self.value = int(state["value"])


@pytest.fixture()
def saved(tiny_model, tmp_path):
    from handrail.runtime.models import load_model

    lm, tok, templates = load_model(tiny_model)
    ck = Checkpoints(tmp_path)
    method = _Method()
    for step in (1, 2):
        with torch.no_grad():
            next(lm.parameters()).fill_(float(step))
        method.value = step
        ck.save(lm, lambda f: torch.save({"step": step}, f / "optimizer.pt"), method, State(step=step), tok, templates)
    return tmp_path, ck, lm


def test_checkpoints_keep_the_previous_one_and_fall_back_to_it(saved):
    out, ck, lm = saved
    assert [p.name for p in ck.complete()] == ["checkpoint", "checkpoint.prev"]
    assert not (out / "checkpoint.tmp").exists()
    method, logs = _Method(), []
    state, opt = ck.load(lm, method, "cpu", logs.append)
    assert state.step == 2 and method.value == 2 and opt == {"step": 2}
    (out / "checkpoint" / "method.pt").write_bytes(b"damaged")
    state, opt = ck.load(lm, method, "cpu", logs.append)
    assert state.step == 1 and method.value == 1 and float(next(lm.parameters()).detach().flatten()[0]) == 1.0
    assert "checkpoint/method.pt" in logs[-1] and "step 1" in logs[-1]
    (out / "checkpoint.prev" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="older ones are damaged too"):
        ck.load(lm, method, "cpu", logs.append)


def test_checkpoints_never_save_a_nonfinite_model(saved):
    out, ck, lm = saved
    with torch.no_grad():
        next(lm.parameters()).fill_(math.nan)
    with pytest.raises(NonFinite, match="no longer finite"):
        ck.save(lm, lambda f: None, _Method(), State(step=3), None, None)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


def test_metrics_cut_back_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)) + '{"step": 5, "lo')
    Checkpoints(tmp_path).truncate_metrics(2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


# -- the parallel strategy (one process) and one step ---------------------------------------------
def _run(tiny_model, tmp_path, **kw):
    from accelerate import Accelerator

    from handrail.runtime.evaluate import PromptIds
    from handrail.methods import METHODS, World
    from handrail.runtime.models import HiddenStates, load_model, stop_ids
    from handrail.runtime.parallel import Parallel
    from handrail.engine.steps import delimiter_table
    from handrail.commands.train import Run, task_and_records

    cfg = TrainConfig(model=tiny_model, out=str(tmp_path), prompts_per_step=4, max_new_tokens=16, train_n=32,
                      level=2, eval_n=0, rollouts=64, lr=1e-3, **kw)
    acc = Accelerator(cpu=True)
    task, records, _ = task_and_records(cfg)
    lm, tok, templates = load_model(tiny_model)
    method = METHODS[cfg.method](cfg, lm, tok, templates, task, PromptIds(tok, templates))  # copies its teacher
    parallel = Parallel(acc, HiddenStates(lm).train(), cfg)
    parallel.prepare()
    return Run(cfg, acc, parallel, method, tok, records, Budget.of(cfg, method), World(), slice(0, 4),
               stop_ids(tok), delimiter_table(tok, cfg.step_delimiter))


@pytest.mark.parametrize("method", ["self-distill", "sft"])
def test_one_step_moves_the_weights_and_charges_the_budget(tiny_model, tmp_path, method):
    from handrail.commands.train import step

    run = _run(tiny_model, tmp_path, method=method)
    before = {n: p.detach().clone() for n, p in run.parallel.lm().named_parameters()}
    state = State()
    row = step(run, state)
    assert state.step == 1 and row["step"] == 1 and row["samples"] == 4 and row["tokens"] > 0
    assert state.rollouts == (4 if method == "self-distill" else 0)
    assert math.isfinite(row["loss/total"]) and row["loss/grad_norm"] > 0
    moved = [n for n, p in run.parallel.lm().named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no weight changed"
    assert all(p.grad is None for p in run.parallel.lm().parameters())  # cleared for the next step


def test_a_nonfinite_step_changes_no_weight_and_enough_of_them_stop(tiny_model, tmp_path):
    from handrail.commands.train import step

    run = _run(tiny_model, tmp_path, method="sft", max_nonfinite=2)
    before = {n: p.detach().clone() for n, p in run.parallel.lm().named_parameters()}
    loss = run.method.student_loss
    run.method.student_loss = lambda *a: (lambda s, m: (s * math.nan, m))(*loss(*a))
    state = State()
    row = step(run, state)
    assert row["nonfinite_steps"] == 1 and state.nonfinite_run == 1
    assert all(torch.equal(p, before[n]) for n, p in run.parallel.lm().named_parameters())
    with pytest.raises(NonFinite, match="2 steps in a row"):
        step(run, state)


def test_single_process_optimizer_state_round_trips(tiny_model, tmp_path):
    from handrail.runtime.parallel import Parallel
    from handrail.commands.train import step

    run = _run(tiny_model, tmp_path, method="sft")
    step(run, State())
    run.parallel.save_optimizer(tmp_path)
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    again = Parallel(run.acc, run.parallel.policy, run.cfg, saved)
    assert run.parallel.name == again.name == "single"
    a, b = run.parallel.opt.state_dict()["state"], again.opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_lean_decoder_false_runs_the_models_own_forward_for_that_run_only(tiny_model, tmp_path, monkeypatch):
    from handrail.engine import decoder
    from handrail.engine import rollout
    from handrail.commands.train import train

    def refused(*a, **k):
        raise AssertionError("the lean decoder ran")

    monkeypatch.setattr(decoder, "hidden_states", refused)
    monkeypatch.setattr(rollout, "LeanDecoder", refused)
    assert decoder.LEAN
    cfg = TrainConfig(model=tiny_model, out=str(tmp_path / "r"), prompts_per_step=4, max_new_tokens=16, train_n=32,
                      level=2, eval_n=4, rollouts=8, lean_decoder=False)
    assert train(cfg, log=lambda *_: None)["step"] == 2
    assert decoder.LEAN  # restored for whatever runs next in the process
    with pytest.raises(AssertionError, match="lean decoder ran"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "s"), "lean_decoder": True}), log=lambda *_: None)


def test_a_method_refuses_another_methods_option_and_accepts_its_off_value():
    from handrail import config as C
    from handrail.methods import METHODS
    from handrail.commands.train import TrainConfig

    with pytest.raises(ValueError, match="config key 'vine_k': method grpo does not read it .*vine"):
        C.build(TrainConfig, overrides={"model": "m", "method": "grpo", "samples_per_prompt": "4", "vine_k": "3"})
    with pytest.raises(ValueError, match="config key 'rule': method sft does not read it"):
        C.build(TrainConfig, overrides={"model": "m", "method": "sft", "rule": "none"})
    # a resolved counterfactual=auto is "none" in every run's config.json, and resumes
    C.build(TrainConfig, overrides={"model": "m", "method": "grpo", "samples_per_prompt": "4", "counterfactual": "none"})
    C.build(TrainConfig, overrides={"model": "m", "method": "vine", "vine_k": "3", "clip_eps": "0.3"})  # vine is a GRPO
    assert METHODS["srpo"].reads() >= METHODS["self-distill"].reads() | METHODS["grpo"].reads()
    every = frozenset().union(*(m.reads() for m in METHODS.values()))
    assert all(key in TrainConfig.__dataclass_fields__ for key in every)  # no option names a key that is not there


def test_a_new_method_brings_its_options_in_its_own_class():
    """A method declared in one place (here, this test) with an Options dataclass: the training
    config composed afterwards has its keys, checks their ranges and choices, refuses them to other
    methods, and refuses them to it where another method's option is set."""
    from dataclasses import dataclass

    from handrail import config as C
    from handrail.commands.train import SharedConfig
    from handrail.methods import METHODS, Method, with_options
    from handrail.methods import Options as Own  # (a class body cannot read this function's `Options`)

    class Mine(Method, name="mine-test"):
        @dataclass
        class Options(Own):
            my_width: int = 3  # how wide
            my_mode: str = "a"  # a | b

            RANGES = {"my_width": "[1, )"}
            CHOICES = {"my_mode": ("a", "b")}

    try:
        Config = with_options(SharedConfig, "TrainConfig", __name__)
        cfg = C.build(Config, overrides={"model": "m", "method": "mine-test", "my_width": "5", "my_mode": "b"})
        assert (cfg.my_width, cfg.my_mode, cfg.delta) == (5, "b", 1.0)  # its keys and every other method's
        with pytest.raises(ValueError, match=r"config key 'my_width': expected a value in \[1, \), got 0"):
            C.build(Config, overrides={"model": "m", "method": "mine-test", "my_width": "0"})
        with pytest.raises(ValueError, match="config key 'my_mode': unknown 'c'; choose a, b"):
            C.build(Config, overrides={"model": "m", "method": "mine-test", "my_mode": "c"})
        with pytest.raises(ValueError, match="config key 'my_width': method sft does not read it .*mine-test"):
            C.build(Config, overrides={"model": "m", "method": "sft", "my_width": "4"})
        with pytest.raises(ValueError, match="config key 'delta': method mine-test does not read it"):
            C.build(Config, overrides={"model": "m", "method": "mine-test", "delta": "0.5"})

        class Clash(Method, name="clash-test"):  # one key, two defaults: refused when composed
            @dataclass
            class Options(Own):
                my_width: int = 4

        with pytest.raises(TypeError, match="'my_width' of Clash is declared twice"):
            with_options(SharedConfig, "TrainConfig", __name__)
    finally:
        METHODS.pop("mine-test", None)
        METHODS.pop("clash-test", None)
