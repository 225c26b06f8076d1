"""Vine: branching rollouts whose per-step values give every token its own advantage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handrail.methods.base import PolicySignal, World
from handrail.methods.grpo import GRPO, pg_token_weights


def branch_points(ends: list[int], n: int) -> list[int]:
    """`n` token positions to branch a rollout at: the start (0) and up to n - 1 of its inner
    step ends, evenly spread; with fewer inner ends than that, the start is used again (more
    continuations for its value). `ends` is steps.step_ends' row (its last entry, the end of
    the completion, is never a branch point: the rollout's own reward is its value)."""
    inner = ends[:-1]
    k = min(n - 1, len(inner))
    chosen = [inner[round((i + 1) * len(inner) / (k + 1)) - 1] for i in range(k)] if k else []
    return sorted([0] * (n - k) + chosen)


def step_advantages(points: list[int], values: list[float], length: int, reward: float, T: int) -> torch.Tensor:
    """(T,) per-token advantages of one rollout from Monte Carlo values: `values[i]` estimates the
    expected reward after the first `points[i]` tokens; the tokens between two points get the
    change in value across them, and the last segment ends at `length` with the rollout's own
    `reward`. Repeated points are averaged into one value."""
    merged: dict[int, list[float]] = {}
    for p, v in zip(points, values):
        merged.setdefault(p, []).append(v)
    marks = sorted((p, sum(v) / len(v)) for p, v in merged.items()) + [(length, reward)]
    adv = torch.zeros(T)
    for (a, va), (b, vb) in zip(marks, marks[1:]):
        adv[a:b] = vb - va
    return adv


class Vine(GRPO, name="vine"):
    """GRPO's loss with a value for every step instead of one advantage per sequence (VinePPO,
    arXiv 2410.01679): each rollout is branched at `vine_points` positions (its start and step
    ends, steps.py); from each, `vine_k` continuations of the current policy estimate the
    expected reward there (Monte Carlo, no value network); a segment's tokens get the change in
    value it causes. A slip in the third line of an otherwise good solution is blamed on that
    line alone. Every continuation counts in the rollout budget (TrainConfig.rollouts_per_step),
    so at equal rollouts vine takes fewer, better-informed steps than GRPO."""

    grouped = False  # its values come from branches, not from a group
    one_per_prompt = True

    @dataclass
    class Options(GRPO.Options):
        vine_points: int = 2  # branch points per rollout (its start and step ends)
        vine_k: int = 2  # continuations per branch point; each counts as a rollout

        RANGES = {"vine_points": "[1, )", "vine_k": "[1, )"}

    @staticmethod
    def rollouts_per_sample(cfg) -> int:
        return 1 + cfg.vine_points * cfg.vine_k

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        from handrail.engine.rollout import sample
        from handrail.engine.steps import delimiter_table, step_ends
        from handrail.runtime.models import stop_ids

        cfg, device = self.cfg, rollout.completion_ids.device
        B, T = rollout.completion_ids.shape
        rewards = self._rewards(records, rollout)
        ends = rollout.step_ends or step_ends(rollout.completion_ids, rollout.completion_mask,
                                              delimiter_table(self.tokenizer, cfg.step_delimiter))
        points = [branch_points(e, cfg.vine_points) for e in ends]
        ids = rollout.completion_ids.tolist()
        prefixes, owners = [], []
        for i, row in enumerate(points):
            for p in row:
                prefixes += [rollout.prompt_ids[i] + ids[i][:p]] * cfg.vine_k
                owners += [(i, p)] * cfg.vine_k
        # one batched, KV-cached call for every continuation; each is then cut to what the
        # rollout's own token budget leaves after its prefix
        branches = sample(lm_now, self.tokenizer, prefixes, max_new_tokens=cfg.max_new_tokens,
                          stop_ids=stop_ids(self.tokenizer), temperature=cfg.temperature, top_p=cfg.top_p)
        cont = branches.completion_ids.tolist()
        mask = branches.completion_mask.tolist()
        values: dict[tuple[int, int], list[float]] = {}
        for j, (i, p) in enumerate(owners):
            keep = [t for t, m in zip(cont[j], mask[j]) if m][:cfg.max_new_tokens - p]
            text = self.tokenizer.decode(ids[i][:p] + keep, skip_special_tokens=True)
            values.setdefault((i, p), []).append(self.reward(text, records[i], p + len(keep)))
        mean = {key: sum(v) / len(v) for key, v in values.items()}  # a repeated point pools its continuations
        adv = torch.stack([
            step_advantages(points[i], [mean[i, p] for p in points[i]], int(rollout.completion_mask[i].sum()),
                            rewards[i].item(), T)
            for i in range(B)]).to(device) * rollout.completion_mask
        weight = pg_token_weights(rollout.completion_mask, cfg.grpo_loss, world.total(rollout.completion_mask.sum()),
                                  B * world.size, cfg.max_new_tokens)
        ref_logp = rollout.logprobs if self.reference is None else self._reference_logp(rollout)
        every = world.gather(rewards)
        credited = (adv != 0).float().sum() / rollout.completion_mask.sum().clamp(min=1)
        return PolicySignal(adv, weight, ref_logp, every, credited=credited)

    def step_metrics(self, signal):
        r = signal.rewards
        return {"reward/mean": r.mean().item(), "vine/credited_tokens": signal.credited.item()}
