"""SRPO: GRPO on the solved rollouts, self-distillation on the failed ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handrail.errors import UsageError
from handrail.methods.base import HybridSignal, Method, World
from handrail.methods.grpo import GRPO
from handrail.methods.self_distill import SelfDistill


class SRPO(Method, name="srpo"):
    """Each rollout to the signal that suits it (SRPO, arXiv 2604.02288): solved rollouts get
    GRPO's policy gradient (the group's advantage, which is positive for them), failed ones
    self-distillation from the privileged teacher (the default rule and gate), so a failure
    learns where it went wrong instead of only that it did. The two token sums are added."""

    privileged = True
    rewarded = True
    grouped = True
    distils = True  # its failed rollouts' target; guided and logged rollouts are self-distill's alone

    @dataclass
    class Options(SelfDistill.Options, GRPO.Options):  # it runs both (not a subclass of either)
        pass

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        SelfDistill.check_teacher(cfg)
        if cfg.rollout in ("guided", "logged"):
            raise UsageError(f"config key 'rollout': {cfg.rollout} rollouts need method self-distill "
                             f"(they need a teacher)")

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        self.distill = SelfDistill(cfg, initial_lm, tokenizer, templates, task, self.prompts)
        # GRPO's KL reference (kl_coef) is the initial model, which a frozen teacher already is
        self.grpo = GRPO(cfg, initial_lm, tokenizer, templates, task, self.prompts,
                         frozen=self.distill.teacher if cfg.teacher == "frozen" else None)
        self.grpo.curriculum, self.distill.curriculum = self.curriculum, None  # one curriculum, the reward's

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        pg = self.grpo.score(records, rollout, lm_now, world)
        sd = self.distill.score(records, rollout, lm_now, world)
        per = len(records)
        solved = (pg.rewards[world.rank * per:(world.rank + 1) * per][:, None] > 0).float()
        pg.weight = pg.weight * solved
        sd.mask = sd.mask * (1 - solved)
        return HybridSignal(pg, sd)

    def loss(self, head, hidden, rollout, signal):
        loss_pg, m_pg = self.grpo.loss(head, hidden, rollout, signal.pg)
        loss_sd, m_sd = self.distill.loss(head, hidden, rollout, signal.sd)
        return loss_pg + loss_sd, {**m_pg, **m_sd}

    def step_metrics(self, signal):
        return self.grpo.step_metrics(signal.pg)

    def after_step(self, lm):
        self.distill.after_step(lm)

    def state_dict(self):
        return {**super().state_dict(), **self.distill.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.distill.load_state_dict(state)
