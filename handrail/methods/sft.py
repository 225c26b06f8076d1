"""SFT: cross-entropy on the records' references, no sampling."""

from __future__ import annotations

import torch

from handrail.data.records import hint_for
from handrail.engine.objectives import chunked_sum, cross_entropy_chunk
from handrail.engine.rollout import Rollout, given_rollout
from handrail.methods.base import Method, TokenSignal, World


class SFT(Method, name="sft"):
    """Supervised fine-tuning: cross-entropy on the reference solutions, teacher-forced, no
    rollouts (its rollout count stays 0; compare counts its examples instead)."""

    needs_rollouts = False

    def given_rollout(self, records, device, lm=None) -> Rollout:
        texts = [hint_for(r, "solution") for r in records]  # the reference, or "#### <answer>" for answer-only
        return given_rollout(self.tokenizer, self.prompts(records), texts, device)

    def score(self, records, rollout, lm_now, world: World):
        return TokenSignal(torch.ones_like(rollout.completion_mask[:, :1]))

    def loss(self, head, hidden, rollout, signal):
        loss, nll = chunked_sum(cross_entropy_chunk, hidden, head, rollout.completion_ids,
                                rollout.completion_mask * signal.weight, chunk_size=self.cfg.chunk_size)
        return loss, {"loss/nll": nll}
