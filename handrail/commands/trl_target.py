"""handrail's target inside TRL's SDFT trainer: keep TRL for generation (vLLM), launch
(accelerate, FSDP, DeepSpeed) and its `prompt` / `privileged_context` columns; distil towards
handrail's aggregated target, with its divergence gate, instead of the raw teacher.

    from handrail.commands.trl_target import HandrailSDFTTrainer          # pip install 'handrail[trl]'
    trainer = HandrailSDFTTrainer(model=..., args=SDFTConfig(...), train_dataset=...,
                                  rule="trust-region", gate="divergence")   # the rest as SDFTTrainer

What changes is one method, the loss on the logits TRL has already computed: per completion
token, KL(q || p_S) with q = rule(p_S, p_T) held constant (handrail/engine/targets.py), zero after the
first token the teacher gives less than `gate_prob` (the divergence gate), averaged over each
completion's tokens and then over completions as TRL does. With `rule="none", gate="none"` q is
the teacher and the loss is TRL's own `full_logits` loss at `distillation_alpha=0` (forward KL);
tests/test_trl_target.py checks both that and equality with handrail's own loss. Rules that
measure from the initial student (`considered`, `anchored`) and the counterfactual teacher need
model passes TRL does not make, and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handrail.errors import UsageError
from handrail.methods import until_divergence
from handrail.engine.targets import kl

try:
    from trl.experimental.sdft import SDFTTrainer
except ImportError as e:  # the extra is missing: say what to install, on import
    raise ImportError("handrail.commands.trl_target needs TRL: pip install 'handrail[trl]'") from e

GATES = ("none", "divergence", "point")


def make_target(rule: str = "trust-region", **params):
    """The rule with handrail's defaults for its parameters (train.TrainConfig), `params` over them."""
    from handrail.commands.train import TrainConfig

    cfg = TrainConfig(rule=rule, **params)
    made = cfg.aggregation_rule()
    if getattr(made, "needs_initial", False):
        raise UsageError(f"rule {rule!r} measures from the initial student, which TRL's trainer does not "
                         f"compute; use trust-region, geometric, support or none")
    return made


def per_token_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, rule) -> torch.Tensor:
    """(B, T) KL(q || p_S), q = rule(p_S, p_T) a constant; gradient through the student only."""
    logp_S = F.log_softmax(student_logits.float(), -1)
    with torch.no_grad():
        logq = rule(logp_S.detach(), F.log_softmax(teacher_logits.float(), -1), None)
    return kl(logq, logp_S)


def gated_mask(teacher_logits: torch.Tensor, completion_ids: torch.Tensor, mask: torch.Tensor, gate: str,
               gate_prob: float) -> torch.Tensor:
    if gate == "none":
        return mask.float()
    with torch.no_grad():
        lp = F.log_softmax(teacher_logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return until_divergence(lp, mask.float(), gate_prob, only_at=gate == "point")


def sequence_mean(per_token: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's reduction: each completion's kept tokens summed over its own length, then the mean."""
    return ((per_token * kept).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


class HandrailSDFTTrainer(SDFTTrainer):
    """`SDFTTrainer` distilling towards handrail's target. `rule` and its parameters (`delta`,
    `lam`, `support_top_p`, …: handrail's names and defaults), `gate` (none, divergence, point)
    and `gate_prob` as in `handrail train`."""

    def __init__(self, *args, rule: str = "trust-region", gate: str = "divergence", gate_prob: float = 0.05,
                 **kwargs):
        params = {k: kwargs.pop(k) for k in ("delta", "lam", "lam_max", "support_top_p", "tau") if k in kwargs}
        if gate not in GATES:
            raise UsageError(f"gate {gate!r}: choose one of {', '.join(GATES)}")
        self.handrail_rule, self.handrail_gate, self.handrail_gate_prob = make_target(rule, **params), gate, gate_prob
        super().__init__(*args, **kwargs)
        if self.args.distillation_mode != "full_logits":
            raise UsageError("HandrailSDFTTrainer needs distillation_mode='full_logits' (the target is over the "
                             "whole vocabulary)")
        if self.use_teacher_server:
            raise UsageError("HandrailSDFTTrainer needs the teacher's logits in this process, not a teacher server")

    def _compute_self_distillation_loss(self, model, inputs, distillation_logits):
        d = distillation_logits
        mask = d.loss_mask.float()
        if mask.sum() == 0:
            return d.student_logits.sum() * 0.0  # attached to the graph: zero gradients, not none
        kept = gated_mask(d.teacher_logits, d.completion_ids, mask, self.handrail_gate, self.handrail_gate_prob)
        per_token = per_token_loss(d.student_logits, d.teacher_logits, self.handrail_rule)
        loss = sequence_mean(per_token, kept, mask)
        mode = "train" if model.training else "eval"
        mean = (per_token.detach() * kept).sum() / kept.sum().clamp(min=1.0)
        self._log_self_distillation_metric(mode, self.accelerator.gather(mean).mean().item())
        self._metrics[mode]["handrail/gated"].append(
            self.accelerator.gather(1 - kept.sum() / mask.sum()).mean().item())
        return loss
