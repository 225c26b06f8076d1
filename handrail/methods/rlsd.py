"""RLSD: GRPO's advantage, each token weighted by how much the privileged teacher agrees with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handrail.methods.base import World, completion_hidden, frozen_copy, token_logps
from handrail.methods.grpo import GRPO
from handrail.runtime.models import HiddenStates


class RLSD(GRPO, name="rlsd"):
    """GRPO whose reward gives each token's direction and the teacher only its size (RLSD,
    arXiv 2604.03128): a token's advantage A is scaled by clip(exp(sign(A) (log p_T - log p_S)),
    1 - eps, 1 + eps), p_T being the privileged teacher (the initial model shown the reference) on
    the sampled token. In a solved rollout, the tokens the teacher would rather write than the
    student get more credit; in a failed one, those it would rather not write get more blame. The
    teacher can neither flip a sign nor create signal where the group has none, so it cannot hand
    over an answer the student did not reach."""

    privileged = True
    needs_solutions = True  # its teacher reads the worked reference

    @dataclass
    class Options(GRPO.Options):
        teacher_weight_clip: float = 0.2  # the teacher scales a token's advantage within 1 +- this

        RANGES = {"teacher_weight_clip": "[0, 1]"}

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        # the KL reference, when kl_coef asks for one, is the same initial model: share it
        self.teacher = self.reference if self.reference is not None else frozen_copy(initial_lm)

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        signal = super().score(records, rollout, lm_now, world)
        hidden_T = completion_hidden(HiddenStates(self.teacher),
                                     self.prompts(records, self.cfg.hint),
                                     rollout, self.tokenizer.pad_token_id)
        lp_T = token_logps(hidden_T, self.teacher.get_output_embeddings(), rollout.completion_ids,
                            self.cfg.temperature, self.cfg.chunk_size)
        eps = self.cfg.teacher_weight_clip
        w = (signal.adv.sign()[:, None] * (lp_T - rollout.logprobs)).exp().clamp(1 - eps, 1 + eps)
        signal.weight = signal.weight * w
        signal.teacher_weight = (w * rollout.completion_mask).sum() / rollout.completion_mask.sum().clamp(min=1)
        return signal

    def step_metrics(self, signal):
        return {**super().step_metrics(signal), "teacher/weight": signal.teacher_weight.item()}
