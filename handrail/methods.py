"""What makes one method differ from another: its per-token training signal.

Every method gives the loop in train.py the same four things: whether it samples student
rollouts, how it `score`s them (no grad; the other processes seen only through a `World`) into a
small typed signal (DistillSignal, PolicySignal, HybridSignal; SFT needs none), the chunked `loss`
it computes from that signal on the student's hidden states (run inside the policy's forward:
`student_loss`), and what to do `after_step`. Nothing else differs between methods — the loop,
the rollout accounting and the evaluation are shared.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from handrail.errors import UsageError
from handrail.data import hint_for
from handrail.evaluate import PromptIds, is_correct, prompt_ids
from handrail.models import AdapterOff, HiddenStates
from handrail.objectives import (chunked_sum, clipped_pg_chunk, cross_entropy_chunk, distill_chunk, fusable,
                                 fused_distill_sum, token_logp)
from handrail.rollout import Guide, Rollout, given_rollout, left_pad, positions, token_rollout


def completion_hidden(model, prompts: list[list[int]], rollout: Rollout, pad_id: int, loss=None):
    """Hidden states (B, T, H) at the positions that predict each completion token, for the
    sequences [prompt, completion]. Prompts are left-padded so every completion starts at one
    column, whatever the prompt's length. With `loss(head, hidden)`, the model's forward applies
    it and returns what it returns (models.HiddenStates), so a wrapper (DDP, FSDP) sees the whole
    loss computed inside one call of the module it wraps."""
    device = rollout.completion_ids.device
    ids_P, attn_P = left_pad(prompts, pad_id, device)
    ids = torch.cat([ids_P, rollout.completion_ids], dim=1)
    attn = torch.cat([attn_P, rollout.completion_mask.long()], dim=1)
    P, T = ids_P.shape[1], rollout.completion_ids.shape[1]
    return model(ids, attn, positions(attn), span=(P - 1, T), loss=loss)


@dataclass(frozen=True)
class World:
    """All a method's `score` may know of the other processes: its rank among `size`, and two
    collectives over them. The loop builds it from accelerate; one process needs none of it."""

    rank: int = 0
    size: int = 1
    gather: Callable = lambda t: t  # every process's tensor, concatenated along dim 0
    total: Callable = lambda t: t  # the sum over processes


# -- signals: what `score` hands to `loss`, one small type per kind of method ---------------------
@dataclass
class DistillSignal:
    """Self-distillation: the teacher (and, for rules that read it, the initial model) as
    (hidden states, head) pairs on the rollout, and where the loss applies."""

    teacher: tuple  # (hidden_B_T_H on [P_T, g], lm head), no gradient
    initial: tuple | None  # the same for the initial model on [P_S, g], or None
    counterfactual: tuple | None  # the same for the teacher shown another problem's reference, or None
    use_T: torch.Tensor | None  # (B, T) 1 where the teacher speaks, 0 where the initial model stands in (anchor)
    mask: torch.Tensor  # (B, T) positions that carry the loss
    gated: torch.Tensor  # positions the divergence gate silenced (a metric)


@dataclass
class PolicySignal:
    """A policy gradient: one advantage per sequence, token weights that set how token losses
    are averaged (and, for RLSD, the teacher's per-token factor), reference log-probs for the KL."""

    adv: torch.Tensor  # (B,) one per sequence, or (B, T) one per token (vine)
    weight: torch.Tensor  # (B, T) or broadcastable
    ref_logp: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # (global B,) every process's rewards, for group metrics
    teacher_weight: torch.Tensor | None = None  # RLSD: mean teacher factor (a metric)
    credited: torch.Tensor | None = None  # vine: the share of tokens with a non-zero advantage (a metric)


@dataclass
class TokenSignal:
    """Cross-entropy on the rollout's own tokens (SFT on references, expert iteration on what its
    search chose), each row weighted."""

    weight: torch.Tensor  # (B, 1) or (B, T): a row's (or token's) weight; 0 drops it


@dataclass
class HybridSignal:
    """SRPO: solved rollouts' policy gradient plus failed rollouts' distillation."""

    pg: PolicySignal
    sd: DistillSignal


def _frozen_copy(lm):
    if isinstance(lm, AdapterOff):  # LoRA: the base with the adapter off is already frozen, and free
        return lm
    teacher = copy.deepcopy(lm).eval()
    teacher.requires_grad_(False)
    return teacher


def until_divergence(logp_T_tokens: torch.Tensor, mask: torch.Tensor, prob: float, only_at: bool = False):
    """`mask` (B, T) kept up to and including each row's first token whose teacher log-prob is
    below log(prob), zero after it; with `only_at`, kept at that first token alone."""
    off = ((logp_T_tokens < math.log(prob)) & (mask > 0)).long()
    before_or_at = (off.cumsum(1) - off) == 0
    return mask * (before_or_at & (off > 0) if only_at else before_or_at).float()


class Method:
    needs_rollouts = True
    privileged = False  # reads a teacher prompt with the reference (its records must fit with the hint)
    needs_solutions = True  # answer-only records get worked solutions first (bootstrap) unless this is False
    rewarded = False  # trains on a verifier's reward, which a curriculum may shape
    grouped = False  # compares completions within a prompt's group (needs samples_per_prompt >= 2)
    distils = False  # its target is self-distillation's (a counterfactual teacher, guided or logged rollouts apply)
    one_per_prompt = False  # compare gives it one rollout (or search) per prompt: what it spends fills the step
    cost_varies = False  # what a step spends is known only once it has run (compare evaluates every step)
    reads_logged = False  # trains on logged conversations' turns (rollout=logged), generating nothing
    # TrainConfig keys this method reads that some other method does not: its own options. A run
    # that sets another method's option would have it silently ignored, so `check` refuses that.
    options: frozenset[str] = frozenset()

    @classmethod
    def reads(cls) -> frozenset[str]:
        """Its own options and those of the methods it extends."""
        return frozenset().union(*(vars(k).get("options", frozenset()) for k in cls.__mro__))

    @staticmethod
    def rollouts_per_sample(cfg) -> int:
        """Rollouts one sampled completion costs (vine: its branches' continuations too)."""
        return 1

    @classmethod
    def check(cls, cfg) -> None:
        """Rules this method puts on the training config (UsageError naming the key)."""
        if cls.grouped and cfg.samples_per_prompt < 2:
            raise UsageError(f"config key 'samples_per_prompt': {cfg.method} compares completions within a group, "
                             f"so it needs at least 2 per prompt, got {cfg.samples_per_prompt}")
        if cfg.rollout in ("guided", "logged") and not cls.distils:
            raise UsageError(f"config key 'rollout': {cfg.rollout} rollouts need method self-distill "
                             f"(they need a teacher)")
        if cfg.counterfactual == "shuffled" and not cls.distils:
            raise UsageError(f"config key 'counterfactual': a counterfactual teacher shapes self-distillation's "
                             f"target (method self-distill or srpo), not {cfg.method}'s")
        key = foreign_option(cls, cfg)
        if key is not None:
            owners = ", ".join(name for name, m in METHODS.items() if key in m.reads())
            raise UsageError(f"config key '{key}': method {cfg.method} does not read it (it is an option of "
                             f"{owners}); leave it out, or choose one of those methods")

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts: PromptIds | None = None):
        from handrail import curriculum

        self.cfg, self.tokenizer, self.templates, self.task = cfg, tokenizer, templates, task
        self.prompts = prompts or PromptIds(tokenizer, templates)  # records' prompt ids, tokenized once
        self.curriculum = curriculum.make(cfg)  # reward methods: the reward may change over the run

    def reward(self, text: str, record, tokens: int) -> float:
        """1 if the verifier accepts the completion, else 0; under a curriculum, what it says."""
        correct = is_correct(text, record, self.task)
        if self.curriculum is None:
            return float(correct)
        return self.curriculum.reward(correct, tokens, self.cfg.max_new_tokens)

    spent: int | None = None  # rollouts the last step used, for methods whose cost varies (None: the loop's count)

    def given_rollout(self, records, device, lm=None) -> Rollout:
        """Text already written, for training without sampling: by default the logged assistant
        turns of conversation records (rollout=logged)."""
        return given_rollout(self.tokenizer, self.prompts(records), [r.completion for r in records], device)

    def student_loss(self, policy, records, rollout, signal):
        """(loss sum, metrics): the student's forward and this method's `loss`, in one call of the
        (possibly wrapped) policy module."""
        return completion_hidden(policy, rollout.prompt_ids, rollout, self.tokenizer.pad_token_id,
                                 loss=lambda head, hidden: self.loss(head, hidden, rollout, signal))

    def guide(self, records, lm_now, done: float = 0.0):
        """A rollout.Guide for guided rollouts, or None to sample the student alone (`done`: the
        share of training steps already taken)."""
        return None

    def score(self, records, rollout, lm_now, world: World):
        """The per-token signal for `loss`, computed without gradient (a small typed dataclass)."""
        raise NotImplementedError

    def loss(self, head, hidden, rollout, signal) -> tuple[torch.Tensor, dict]:
        """(loss summed over completion tokens, metrics summed likewise), from the student's hidden
        states at the completion's positions and `signal`; run inside the policy's forward."""
        raise NotImplementedError

    def after_step(self, lm) -> None:
        pass

    def step_metrics(self, signal) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"curriculum": self.curriculum.state_dict()} if self.curriculum else {}

    def load_state_dict(self, state: dict) -> None:
        if self.curriculum and "curriculum" in state:
            self.curriculum.load_state_dict(state["curriculum"])


class SelfDistill(Method):
    """On-policy self-distillation from a privileged teacher (docs/method.md): the student samples
    g ~ pi(.|P_S); the same model shown the reference, [P_T, g], gives teacher logits; the target
    is q = A(p_S, p_T) (an aggregation rule, targets.py) and the loss is sum_t KL(q_t || p_S,t)
    with q held constant. Teacher weights are the initial model (`frozen`), the current one
    without gradient (`live`), or an EMA of the student (`ema`).

    `gate=divergence` trusts the teacher up to and including the first sampled token it gives
    probability < `gate_prob`, and silences it after: once the student has left the path the
    teacher would take, the teacher is reading text unlike anything it would write, and what it
    then predicts is mostly the reference's continuation, not the student's (measured in
    benchmarks/teacher_probe.py). At the divergence point itself it intervenes fully
    (`gate=point`: only there). With `after_gate=anchor` the silenced positions get the initial
    model on [P_S, g] as their reference instead of no loss, so they cannot drift; measured, it
    also holds the student back (benchmarks/HISTORY.md §2c). Rules that measure from the initial student
    (`considered`, `anchored`) get that same initial model's distribution at every position."""

    privileged = True
    distils = True
    reads_logged = True
    options = frozenset({"rule", "lam", "delta", "tau", "lam_max", "support_top_p", "teacher", "ema_decay",
                         "counterfactual", "teacher_topk", "intervene_kl", "gate", "gate_prob", "after_gate",
                         "guided_until"})

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        self.rule = cfg.aggregation_rule()
        self.teacher = None if cfg.teacher == "live" else _frozen_copy(initial_lm)
        # the initial model on the student's own prompt: what rules that measure from the initial
        # student read (targets.NEEDS_INITIAL), and the reference where the gate silences the
        # teacher with after_gate=anchor
        self.initial = None
        if (self.rule.needs_initial or cfg.counterfactual == "shuffled"
                or (cfg.gate != "none" and cfg.after_gate == "anchor")):
            self.initial = self.teacher if cfg.teacher == "frozen" else _frozen_copy(initial_lm)

    def teacher_prompts(self, records) -> list[list[int]]:
        return self.prompts(records, self.cfg.hint)

    def counterfactual_prompts(self, records) -> list[list[int]]:
        """Each row's problem with the next distinct problem's reference in the batch (a wrong
        reference that looks like a right one): the counterfactual teacher's prompts."""
        distinct = list({id(r): r for r in records}.values())
        after = {id(r): distinct[(i + 1) % len(distinct)] for i, r in enumerate(distinct)}
        wrong = [replace(r, solution=hint_for(after[id(r)], self.cfg.hint)) for r in records]
        return prompt_ids(self.tokenizer, wrong, self.templates, "solution")  # not cached: new every step

    def guide(self, records, lm_now, done: float = 0.0):
        if self.cfg.rollout != "guided" or done >= self.cfg.guided_until:
            return None
        teacher = self.teacher if self.teacher is not None else lm_now
        initial = None
        if self.rule.needs_initial:
            initial = (self.initial, self.prompts(records))
        return Guide(teacher, self.teacher_prompts(records), self.rule, initial)

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        teacher = self.teacher if self.teacher is not None else lm_now
        was = teacher.training
        if was:  # the live policy; a frozen teacher is in eval mode already (switching walks every module)
            teacher.eval()
        hidden_T = completion_hidden(HiddenStates(teacher), self.teacher_prompts(records), rollout,
                                     self.tokenizer.pad_token_id)
        if was:
            teacher.train()
        head_T = teacher.get_output_embeddings()
        mask = rollout.completion_mask
        if self.cfg.gate in ("divergence", "point"):
            lp_T = _token_logps(hidden_T, head_T, rollout.completion_ids, 1.0, self.cfg.chunk_size)
            mask = until_divergence(lp_T, mask, self.cfg.gate_prob, only_at=self.cfg.gate == "point")
        gated = (rollout.completion_mask - mask).sum()
        initial, use_T, counter = None, None, None
        if self.initial is not None:
            initial = (completion_hidden(HiddenStates(self.initial), rollout.prompt_ids, rollout,
                                         self.tokenizer.pad_token_id), self.initial.get_output_embeddings())
        if self.cfg.counterfactual == "shuffled":
            counter = (completion_hidden(HiddenStates(teacher), self.counterfactual_prompts(records), rollout,
                                         self.tokenizer.pad_token_id), head_T)
        if self.cfg.gate != "none" and self.cfg.after_gate == "anchor":
            # where the teacher is silenced, the initial model on the student's own prompt (what the
            # student did before training) becomes the reference, so those positions cannot drift
            use_T, mask = mask, rollout.completion_mask
        return DistillSignal((hidden_T, head_T), initial, counter, use_T, mask, gated)

    def loss(self, head, hidden, rollout, signal):
        refs = (signal.teacher, signal.initial, signal.counterfactual)
        if fusable(head):  # gradient taken in the forward pass: no chunk recomputed in backward
            loss, kl_sum, intervened, raw = fused_distill_sum(
                self.rule, hidden, head, signal.mask, signal.use_T, refs=refs,
                intervene_kl=self.cfg.intervene_kl, chunk_size=self.cfg.chunk_size, topk=self.cfg.teacher_topk)
        else:
            loss, kl_sum, intervened, raw = chunked_sum(
                distill_chunk(self.rule, self.cfg.intervene_kl, self.cfg.teacher_topk), hidden, head,
                signal.mask, signal.use_T,
                chunk_size=self.cfg.chunk_size, refs=refs)
        return loss, {"teacher/kl": kl_sum, "teacher/intervened": intervened, "teacher/raw_kl": raw,
                      "teacher/gated": signal.gated}

    @torch.no_grad()
    def after_step(self, lm):
        if self.cfg.teacher == "ema":
            for t, s in zip(self.teacher.parameters(), lm.parameters()):
                t.lerp_(s.detach(), 1 - self.cfg.ema_decay)

    def state_dict(self):
        return {**super().state_dict(), **({"ema": self.teacher.state_dict()} if self.cfg.teacher == "ema" else {})}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "ema" in state:
            self.teacher.load_state_dict(state["ema"])


class GRPO(Method):
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
    options = frozenset({"clip_eps", "kl_coef", "grpo_loss", "scale_rewards"})

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None, frozen=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        # `frozen`: a frozen copy of the initial model another part of the method already holds
        self.reference = (frozen or _frozen_copy(initial_lm)) if cfg.kl_coef else None

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
        return _token_logps(hidden, self.reference.get_output_embeddings(), rollout.completion_ids,
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


@torch.no_grad()
def _token_logps(hidden, head, tokens, temperature, chunk):
    out = []
    for s in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, s:s + chunk]).float() / max(temperature, 1e-6)
        out.append(token_logp(logits, tokens[:, s:s + chunk]))
    return torch.cat(out, dim=1)


class SFT(Method):
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


class RLSD(GRPO):
    """GRPO whose reward gives each token's direction and the teacher only its size (RLSD,
    arXiv 2604.03128): a token's advantage A is scaled by clip(exp(sign(A) (log p_T - log p_S)),
    1 - eps, 1 + eps), p_T being the privileged teacher (the initial model shown the reference) on
    the sampled token. In a solved rollout, the tokens the teacher would rather write than the
    student get more credit; in a failed one, those it would rather not write get more blame. The
    teacher can neither flip a sign nor create signal where the group has none, so it cannot hand
    over an answer the student did not reach."""

    privileged = True
    needs_solutions = True  # its teacher reads the worked reference
    options = frozenset({"teacher_weight_clip"})

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        # the KL reference, when kl_coef asks for one, is the same initial model: share it
        self.teacher = self.reference if self.reference is not None else _frozen_copy(initial_lm)

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        signal = super().score(records, rollout, lm_now, world)
        hidden_T = completion_hidden(HiddenStates(self.teacher),
                                     self.prompts(records, self.cfg.hint),
                                     rollout, self.tokenizer.pad_token_id)
        lp_T = _token_logps(hidden_T, self.teacher.get_output_embeddings(), rollout.completion_ids,
                            self.cfg.temperature, self.cfg.chunk_size)
        eps = self.cfg.teacher_weight_clip
        w = (signal.adv.sign()[:, None] * (lp_T - rollout.logprobs)).exp().clamp(1 - eps, 1 + eps)
        signal.weight = signal.weight * w
        signal.teacher_weight = (w * rollout.completion_mask).sum() / rollout.completion_mask.sum().clamp(min=1)
        return signal

    def step_metrics(self, signal):
        return {**super().step_metrics(signal), "teacher/weight": signal.teacher_weight.item()}


class SRPO(Method):
    """Each rollout to the signal that suits it (SRPO, arXiv 2604.02288): solved rollouts get
    GRPO's policy gradient (the group's advantage, which is positive for them), failed ones
    self-distillation from the privileged teacher (the default rule and gate), so a failure
    learns where it went wrong instead of only that it did. The two token sums are added."""

    privileged = True
    rewarded = True
    grouped = True
    distils = True  # its failed rollouts' target; guided and logged rollouts are self-distill's alone
    options = SelfDistill.options | GRPO.options  # it runs both (not a subclass of either)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
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


class Vine(GRPO):
    """GRPO's loss with a value for every step instead of one advantage per sequence (VinePPO,
    arXiv 2410.01679): each rollout is branched at `vine_points` positions (its start and step
    ends, steps.py); from each, `vine_k` continuations of the current policy estimate the
    expected reward there (Monte Carlo, no value network); a segment's tokens get the change in
    value it causes. A slip in the third line of an otherwise good solution is blamed on that
    line alone. Every continuation counts in the rollout budget (TrainConfig.rollouts_per_step),
    so at equal rollouts vine takes fewer, better-informed steps than GRPO."""

    grouped = False  # its values come from branches, not from a group
    one_per_prompt = True
    options = frozenset({"vine_points", "vine_k"})

    @staticmethod
    def rollouts_per_sample(cfg) -> int:
        return 1 + cfg.vine_points * cfg.vine_k

    @torch.no_grad()
    def score(self, records, rollout, lm_now, world: World):
        from handrail.models import stop_ids
        from handrail.rollout import sample
        from handrail.steps import delimiter_table, step_ends

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


class ExpertIteration(Method):
    """The AlphaZero loop with steps as moves (search.py): each prompt is searched with the current
    policy (step-level pUCT, `search_simulations` per move, `search_candidates` per expansion),
    and the policy is trained by cross-entropy towards each move's visit distribution over its
    candidate steps (each step's tokens weighted by its share of the visits), plus the rest of a
    completion that passed the check, if the search found one. Values: the task's program check
    where there is one, else the reference answer (training data, so no oracle here). Every
    sequence the search samples, candidate step or rollout, counts as one rollout in the budget,
    which is conservative: a candidate step is a fraction of a completion."""

    needs_rollouts = False  # it samples inside the search
    needs_solutions = False  # values come from the check or the answer
    one_per_prompt = True
    cost_varies = True
    options = frozenset({"search_simulations", "search_candidates", "search_value"})

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.search_value == "check" and cfg.data:
            raise UsageError("config key 'search_value': check needs a task with a program check (the embedded "
                             "tasks); with --data use answer")

    def given_rollout(self, records, device, lm=None) -> Rollout:
        from handrail.search import Problem, SearchConfig, Searcher, value_mode

        cfg = self.cfg
        searcher = Searcher(lm, self.tokenizer, self.templates, self.task, SearchConfig(
            simulations=cfg.search_simulations, candidates=cfg.search_candidates,
            value=value_mode(self.task, cfg.search_value),
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, delimiter=cfg.step_delimiter))
        with torch.no_grad():
            problems = searcher.search([Problem(r, ids) for r, ids in
                                        zip(records, self.prompts(records))])
        self.spent = searcher.sequences
        rows = []  # (prompt ids, completion ids, weight)
        for p in problems:
            for root, children in p.moves:
                total = sum(v for _, v in children)
                rows += [(p.prompt + root, tokens[len(root):], v / total) for tokens, v in children]
            if p.solution_tokens is not None:  # found and checked: the rest of it, from where the moves stopped
                rows.append((p.prompt + p.root.tokens, p.solution_tokens[len(p.root.tokens):], 1.0))
        rows = [r for r in rows if r[1]] or [(problems[0].prompt, [self.tokenizer.pad_token_id], 0.0)]
        prompts, comps, weights = zip(*rows)
        rollout = token_rollout(list(prompts), list(comps), self.tokenizer.pad_token_id,
                                self.tokenizer.batch_decode(comps, skip_special_tokens=True), device)
        rollout.weights = torch.tensor(weights, device=device)[:, None]  # each row's share of the visits
        rollout.completion_mask *= (rollout.weights > 0).float()  # the stand-in row of a step that found nothing
        return rollout

    def score(self, records, rollout, lm_now, world: World):
        return TokenSignal(rollout.weights)

    def loss(self, head, hidden, rollout, signal):
        loss, nll = chunked_sum(cross_entropy_chunk, hidden, head, rollout.completion_ids,
                                rollout.completion_mask * signal.weight, chunk_size=self.cfg.chunk_size)
        return loss, {"loss/nll": nll}

    def step_metrics(self, signal):
        return {"search/rows": int(signal.weight.numel()), "search/sequences": self.spent}


# Values that switch an option off: any method may carry them (a resolved counterfactual=auto is
# "none" in every run's config.json, whatever its method).
OFF = {"counterfactual": "none", "teacher_topk": 0, "kl_coef": 0.0, "gate": "none"}


def foreign_option(method: type[Method], cfg) -> str | None:
    """The first key of `cfg` that only other methods read and that is set away from its default
    (or its OFF value), or None."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(cfg)}
    others = frozenset().union(*(m.reads() for m in METHODS.values())) - method.reads()
    return next((key for key in sorted(others)
                 if getattr(cfg, key) not in (defaults[key], OFF.get(key, defaults[key]))), None)


METHODS = {"self-distill": SelfDistill, "grpo": GRPO, "sft": SFT, "rlsd": RLSD, "srpo": SRPO, "vine": Vine,
           "expert-iteration": ExpertIteration}
