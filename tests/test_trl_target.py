"""handrail's target inside TRL's SDFTTrainer (handrail[trl])."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.experimental.sdft import SDFTTrainer  # noqa: E402
from trl.experimental.sdft.sdft_trainer import DistillationLogits  # noqa: E402

from handrail.methods import until_divergence  # noqa: E402
from handrail.engine.objectives import distill_chunk  # noqa: E402
from handrail.commands.trl_target import HandrailSDFTTrainer, make_target  # noqa: E402


def batch(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    teacher = 3 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    return DistillationLogits(completion_ids=ids, loss_mask=mask, student_logits=student, teacher_logits=teacher)


def stub(rule="trust-region", gate="divergence", gate_prob=0.05, **params):
    """What the two loss methods read from a trainer."""
    return SimpleNamespace(
        args=SimpleNamespace(distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=None,
                             distillation_topk=None, distillation_add_tail=False),
        accelerator=SimpleNamespace(gather=lambda x: x), _metrics={"train": defaultdict(list)},
        _log_self_distillation_metric=lambda mode, value: None,
        handrail_rule=make_target(rule, **params), handrail_gate=gate, handrail_gate_prob=gate_prob)


def loss_and_grad(method, trainer, d):
    d.student_logits.grad = None
    loss = method(trainer, SimpleNamespace(training=True), {}, d)
    loss.backward()
    return loss.detach(), d.student_logits.grad.clone()


def test_rule_none_without_the_gate_is_trls_own_forward_kl_loss():
    d = batch()
    ours = loss_and_grad(HandrailSDFTTrainer._compute_self_distillation_loss, stub("none", "none"), d)
    theirs = loss_and_grad(SDFTTrainer._compute_self_distillation_loss, stub(), d)
    assert ours[0] > 0
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours[1], theirs[1], atol=1e-6)


def test_trust_region_with_the_gate_is_handrails_own_loss_on_the_same_logits():
    d = batch(1)
    trainer = stub("trust-region", "divergence", gate_prob=0.2, delta=0.5)
    loss, _ = loss_and_grad(HandrailSDFTTrainer._compute_self_distillation_loss, trainer, d)
    # handrail's loop: the gate from the teacher's log-probs of the sampled tokens, then its chunk loss
    lp = torch.log_softmax(d.teacher_logits, -1).gather(-1, d.completion_ids[..., None])[..., 0]
    kept = until_divergence(lp, d.loss_mask.float(), 0.2)
    assert 0 < kept.sum() < d.loss_mask.sum()  # the gate silenced some positions, not all
    fn = distill_chunk(make_target("trust-region", delta=0.5))
    per_row = torch.stack([fn(d.student_logits[i:i + 1], d.teacher_logits[i:i + 1], None, None, kept[i:i + 1], None)[0]
                           for i in range(3)])
    expected = (per_row / d.loss_mask.sum(-1).clamp(min=1)).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert trainer._metrics["train"]["handrail/gated"] == [pytest.approx(1 - float(kept.sum() / d.loss_mask.sum()))]


def test_rules_trl_cannot_feed_are_refused():
    with pytest.raises(ValueError, match="initial student"):
        make_target("anchored")


def test_one_training_step_inside_trls_trainer(tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.sdft import SDFTConfig

    from handrail.runtime.models import load_model
    from handrail.data.records import student_prompt, teacher_prompt
    from handrail.commands.sources import eval_records

    _, tok, tpl = load_model(tiny_model)
    _, recs = eval_records("chain", None, n=4, level=2)
    rows = []
    for r in recs:
        p, t = student_prompt(tok, r, tpl), teacher_prompt(tok, r, tpl)
        rows.append({"prompt": p, "privileged_context": t[len(p):]})
    args = SDFTConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, num_generations=1, max_steps=1,
                      teacher_model_kind="base", teacher_prompt_template="{prompt}{privileged_context}",
                      distillation_mode="full_logits", max_completion_length=12, use_cpu=True, report_to="none",
                      save_strategy="no", gradient_checkpointing=False, logging_steps=1, learning_rate=1e-3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = HandrailSDFTTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                                  rule="trust-region", gate="divergence")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "handrail/gated" in h]
    assert logged and 0 <= logged[0]["handrail/gated"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
