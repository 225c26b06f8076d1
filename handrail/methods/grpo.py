"""GRPO: a verifier's reward, normalised within each prompt's group, as a clipped policy gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handrail.engine.objectives import chunked_sum, clipped_pg_chunk
from handrail.methods.base import Method, Options, PolicySignal, World, completion_hidden, frozen_copy, token_logps
from handrail.runtime.models import HiddenStates


class GRPO(Method, name="grpo"):
    """GRPO as in DeepSeekMath, with: G samples per prompt; reward 1 if the task verifier accepts
    the final answer, else 0; advantage r - mean_group, divided by (std_group + 1e-4) unless
    `scale_rewards` is off; one policy update per batch (mu = 1, so the PPO ratio starts at 1 and
    the clip only matters numerically); optional KL to the initial model with the k3 estimator
    (`kl_coef`, default 0 as in DAPO/Dr.GRPO). `grpo_loss` is how token losses are averaged, the
    choice the variants in use differ by:
    - `dapo`: summed over all tokens of the batch, divided by their count (token-level);
    - `grpo`: averaged within each sequence, then over sequences (the original; long sequences
      weigh less per token);
    - `dr_grpo`: summed, divided by sequences x max_new_tokens (a constant: no length bias);
      Dr. GRPO also turns `scale_rewards` off."""

    needs_solutions = False  # the reward reads only the answer
    rewarded = True
    grouped = True

    @dataclass
    class Options(Options):
        clip_eps: float = 0.2  # ratio clip
        kl_coef: float = 0.0  # weight of KL to the initial model (0 = no reference pass)
        grpo_loss: str = "dapo"  # how token losses are averaged: dapo (over tokens) | grpo (per sequence) | dr_grpo (constant)
        scale_rewards: bool = True  # divide advantages by the group's reward std (Dr. GRPO: false)

        RANGES = {"clip_eps": "(0, )", "kl_coef": "[0, )"}
        CHOICES = {"grpo_loss": ("dapo", "grpo", "dr_grpo")}

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None, frozen=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        # `frozen`: a frozen copy of the initial model another part of the method already holds
        self.reference = (frozen or frozen_copy(initial_lm)) if cfg.kl_coef else None

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        every = world.gather(self._rewards(records, rollout))  # groups may straddle processes
        groups = every.view(-1, self.cfg.samples_per_prompt)
        adv = groups - groups.mean(1, keepdim=True)
        if self.cfg.scale_rewards:
            adv = adv / (groups.std(1, keepdim=True, unbiased=False) + 1e-4)
        per = len(records)
        adv = adv.flatten()[world.rank * per:(world.rank + 1) * per]
        mask = rollout.completion_mask
        weight = pg_token_weights(mask, self.cfg.grpo_loss, world.total(mask.sum()),
                                  len(records) * world.size, self.cfg.max_new_tokens)
        ref_logp = rollout.logprobs if self.reference is None else self._reference_logp(rollout)
        return PolicySignal(adv, weight, ref_logp, every)

    def _rewards(self, records, rollout) -> torch.Tensor:
        """(B,) each rollout's reward (`reward`: the verifier, shaped by a curriculum if any)."""
        lengths = rollout.completion_mask.sum(1).tolist()
        return torch.tensor([self.reward(t, r, n) for t, r, n in zip(rollout.texts, records, lengths)],
                            device=rollout.completion_ids.device)

    def _reference_logp(self, rollout):
        hidden = completion_hidden(HiddenStates(self.reference), rollout.prompt_ids, rollout,
                                   self.tokenizer.pad_token_id)
        return token_logps(hidden, self.reference.get_output_embeddings(), rollout.completion_ids,
                            self.cfg.temperature, self.cfg.chunk_size)

    def loss(self, head, hidden, rollout, signal):
        B, T = rollout.completion_ids.shape
        fn = clipped_pg_chunk(self.cfg.clip_eps, self.cfg.kl_coef)
        temp = max(self.cfg.temperature, 1e-6)
        adv = signal.adv if signal.adv.dim() == 2 else signal.adv[:, None]
        loss, k3, clipped = chunked_sum(
            lambda logits, *a: fn(logits / temp, *a), hidden, head, rollout.completion_ids,
            rollout.logprobs, signal.ref_logp, adv * signal.weight.expand(B, T),
            rollout.completion_mask, chunk_size=self.cfg.chunk_size)
        return loss, {"policy/kl_ref": k3, "policy/clipped": clipped}

    def step_metrics(self, signal):
        r = signal.rewards
        groups = r.view(-1, self.cfg.samples_per_prompt)
        solved = ((groups.max(1).values - groups.min(1).values) > 0).float().mean()
        return {"reward/mean": r.mean().item(), "reward/groups_with_signal": solved.item()}


def pg_token_weights(mask: torch.Tensor, kind: str, n_tokens: torch.Tensor, n_seqs: int,
                     max_new_tokens: int) -> torch.Tensor:
    """(B, T) weights that turn the loop's "sum over tokens / global token count" into the
    variant's own average (GRPO's docstring); the KL term, if any, stays a token average."""
    if kind == "grpo":
        return (n_tokens / (n_seqs * mask.sum(1, keepdim=True).clamp(min=1))).expand_as(mask)
    if kind == "dr_grpo":
        return torch.full_like(mask, float(n_tokens) / (n_seqs * max_new_tokens))
    return torch.ones_like(mask)
