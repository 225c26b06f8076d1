"""Self-distillation from a privileged teacher: the student's own rollout, scored token by token
against the aggregated target of the teacher shown the reference."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from handrail.data.records import hint_for
from handrail.errors import UsageError
from handrail.engine.objectives import chunked_sum, distill_chunk, fusable, fused_distill_sum
from handrail.engine.rollout import Guide
from handrail.engine.targets import RULES
from handrail.methods.base import (DistillSignal, Method, Options, World, completion_hidden, frozen_copy,
                                   token_logps, until_divergence)
from handrail.runtime.evaluate import prompt_ids
from handrail.runtime.models import HiddenStates


class SelfDistill(Method, name="self-distill"):
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

    @dataclass
    class Options(Options):
        rule: str = "trust-region"  # aggregation (targets.py): trust-region | geometric | support | none | considered | anchored
        teacher: str = "frozen"  # frozen (initial weights) | live (current, no grad) | ema
        ema_decay: float = 0.95  # for teacher=ema
        lam: float = 0.5  # geometric rule: weight of the teacher
        delta: float = 1.0  # trust-region: max nats the teacher may move the student per token and step; anchored: from the initial student, in all
        tau: float = 0.1  # considered: the initial student's probability above which the teacher may promote a token
        lam_max: float = 1.0  # trust-region rule: upper end of the lambda search
        support_top_p: float = 0.9  # support rule: the student's nucleus
        counterfactual: str = "auto"  # none | shuffled: the teacher counts only beyond what another problem's reference also makes it say (targets.counterfactual; one more teacher pass and the initial model's) | auto: shuffled if, before training, the teacher shown the reference states the answer before the work more often than the student does (resolve_counterfactual), else none
        teacher_topk: int = 0  # 0 = the teacher's full distribution; K = its K most likely tokens plus a tail bucket (what a served teacher sends)
        intervene_kl: float = 0.01  # a position counts as "teacher intervened" above this KL(q||p_S)
        gate: str = "divergence"  # none | divergence: silence the teacher after the student leaves its path | point: only where it leaves
        guided_until: float = 1.0  # rollout=guided: the share of training steps, from the start, whose rollouts are guided (the student's own after)
        gate_prob: float = 0.05  # divergence gate: a sampled token the teacher gives < this ends its say
        after_gate: str = "free"  # where the gate silences the teacher: free (no loss) | anchor (pull towards the initial model)

        RANGES = {"ema_decay": "[0, 1]", "lam": "[0, 1]", "delta": "[0, )", "tau": "[0, 1]", "lam_max": "[0, 1]",
                  "support_top_p": "(0, 1]", "intervene_kl": "[0, )", "gate_prob": "[0, 1]", "guided_until": "[0, 1]",
                  "teacher_topk": "[0, )"}
        CHOICES = {"rule": RULES, "teacher": ("frozen", "live", "ema"), "counterfactual": ("none", "shuffled", "auto"),
                   "gate": ("none", "divergence", "point"), "after_gate": ("free", "anchor")}

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        cls.check_teacher(cfg)

    @staticmethod
    def check_teacher(cfg) -> None:
        """The rules on the teacher's options (SRPO, which runs this method, checks them too)."""
        if cfg.lora_r and cfg.teacher == "ema":
            raise UsageError("config key 'teacher': ema keeps its own copy of every weight; with LoRA "
                             "(lora_r > 0) use frozen (the base, adapter off) or live")
        if cfg.counterfactual == "shuffled" and cfg.prompts_per_step < 2:
            raise UsageError("config key 'counterfactual': the wrong reference is another problem's in the same "
                             "step, so prompts_per_step must be at least 2")

    def __init__(self, cfg, initial_lm, tokenizer, templates, task, prompts=None):
        super().__init__(cfg, initial_lm, tokenizer, templates, task, prompts)
        self.rule = cfg.aggregation_rule()
        self.teacher = None if cfg.teacher == "live" else frozen_copy(initial_lm)
        # the initial model on the student's own prompt: what rules that measure from the initial
        # student read (targets.NEEDS_INITIAL), and the reference where the gate silences the
        # teacher with after_gate=anchor
        self.initial = None
        if (self.rule.needs_initial or cfg.counterfactual == "shuffled"
                or (cfg.gate != "none" and cfg.after_gate == "anchor")):
            self.initial = self.teacher if cfg.teacher == "frozen" else frozen_copy(initial_lm)

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
            lp_T = token_logps(hidden_T, head_T, rollout.completion_ids, 1.0, self.cfg.chunk_size)
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
