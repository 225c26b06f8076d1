"""The brevity curriculum: its schedule by hand, its reward, and a run that logs and saves it."""

import json

import pytest
import torch

from handrail.methods.curriculum import Brevity
from handrail.commands.train import TrainConfig, train


def test_brevity_schedule_by_hand():
    b = Brevity(step=0.05, max_alpha=0.12, margin=0.02, patience=1)
    b.update(0.5)
    b.update(0.6)                 # still rising: no pressure
    assert (b.alpha, b.shortening) == (0.0, False)
    b.update(0.6)                 # no new best for `patience` checks: shortening starts
    assert b.shortening and b.alpha == pytest.approx(0.05)
    b.update(0.59)                # within the margin of the best: grows
    assert b.alpha == pytest.approx(0.10)
    b.update(0.6)
    assert b.alpha == pytest.approx(0.12)  # capped
    b.update(0.55)                # fell more than the margin: backs off
    assert b.alpha == pytest.approx(0.07)


def test_brevity_reward_never_favours_a_wrong_answer():
    b = Brevity(alpha=0.5)
    assert b.reward(True, 32, 64) == pytest.approx(0.75)
    assert b.reward(True, 100, 64) == pytest.approx(0.5)   # capped at the budget
    assert b.reward(False, 1, 64) == 0.0
    assert b.reward(True, 64, 64) > b.reward(False, 1, 64)


def test_brevity_run_logs_and_checkpoints_its_pressure(tiny_model, tmp_path):
    out = tmp_path / "r"
    train(TrainConfig(model=tiny_model, out=str(out), method="grpo", samples_per_prompt=4, prompts_per_step=2,
                      rollouts=32, max_new_tokens=24, eval_n=4, train_n=32, level=2, eval_every=1,
                      checkpoint_every=2, curriculum="brevity", brevity_patience=0, brevity_step=0.1,
                      curriculum_n=8), log=lambda *_: None)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    alphas = [r["curriculum/alpha"] for r in rows if "curriculum/alpha" in r]
    assert len(alphas) == 3  # steps 1-3 (the last step ends the run)
    # the tiny model solves nothing, so accuracy never falls below its best: the pressure grows
    assert alphas == pytest.approx([0.1, 0.2, 0.3])
    saved = torch.load(out / "checkpoint" / "method.pt", weights_only=True)
    assert saved["curriculum"]["alpha"] == pytest.approx(0.3)


def test_brevity_needs_a_reward_method(tiny_model):
    from handrail import config as C

    with pytest.raises(ValueError, match="config key .curriculum.: brevity shapes a reward"):
        C.build(TrainConfig, overrides=dict(model=tiny_model, method="self-distill", curriculum="brevity"))
