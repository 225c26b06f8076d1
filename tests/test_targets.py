"""Property tests for the aggregation rules (targets.py), against the guarantees in its table."""

import math

import pytest
import torch
import torch.nn.functional as F

from handrail.targets import RULES, geometric, kl, make_rule, none, support, trust_region

V = 50


def rand_logp(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(*shape, V, generator=g) * scale, -1)


@pytest.mark.parametrize("name", list(RULES))
def test_teacher_equals_student_gives_student_and_zero_loss(name):
    logp = rand_logp(4, 7)
    logq = make_rule(name)(logp, logp)
    assert torch.allclose(logq.exp(), logp.exp(), atol=1e-6)
    assert kl(logq, logp).max() < 1e-6


@pytest.mark.parametrize("name", list(RULES))
def test_target_is_a_distribution(name):
    logq = make_rule(name)(rand_logp(3, 5, seed=1), rand_logp(3, 5, seed=2))
    assert torch.isfinite(logq.exp()).all()
    assert torch.allclose(logq.exp().sum(-1), torch.ones(3, 5), atol=1e-5)


@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_trust_region_never_moves_student_more_than_delta(delta):
    S, T = rand_logp(64, seed=3), rand_logp(64, scale=8.0, seed=4)
    moved = kl(trust_region(S, T, delta=delta), S)
    assert (moved <= delta + 1e-5).all()
    assert moved.max() > 0.5 * delta  # it does use the room it has (the teacher disagrees a lot)


def test_trust_region_takes_lam_max_when_the_teacher_is_close():
    S = rand_logp(8, seed=5)
    T = F.log_softmax(S + 0.01 * torch.randn(8, V), -1)
    assert torch.allclose(trust_region(S, T, delta=1.0, lam_max=0.7), geometric(S, T, lam=0.7), atol=1e-6)


def _one_hot_teacher(S, y):
    return torch.full_like(S, -30.0).scatter(-1, y[..., None], 0.0).log_softmax(-1)


def test_trust_region_caps_what_a_confident_teacher_can_give_an_unlikely_token():
    eps, delta = 1e-6, 0.1
    S = rand_logp(16, seed=6)
    y = torch.zeros(16, dtype=torch.long)
    S = S.clone()
    S[:, 0] = math.log(eps)
    S = S.log_softmax(-1)  # token 0 now has probability <= ~eps
    assert (S[:, 0].exp() <= 2 * eps).all()
    q = trust_region(S, _one_hot_teacher(S, y), delta=delta).exp()[:, 0]
    bound = (delta + math.log(2)) / math.log(1 / (2 * eps))
    assert (q <= bound).all()
    assert (none(S, _one_hot_teacher(S, y)).exp()[:, 0] > 0.99).all()  # plain distillation copies it


def test_geometric_has_no_such_bound():
    """Documented in targets.py: a one-hot teacher makes the geometric target one-hot."""
    S = rand_logp(4, seed=7)
    S[:, 0] = -20.0
    S = S.log_softmax(-1)
    q = geometric(S, _one_hot_teacher(S, torch.zeros(4, dtype=torch.long)), lam=0.5).exp()[:, 0]
    assert (q > 0.9).all()


def test_support_leaves_tokens_outside_the_nucleus_untouched():
    top_p = 0.9
    S = rand_logp(32, scale=4.0, seed=8)
    T = rand_logp(32, scale=8.0, seed=9)
    eps = (1 - top_p) / V * 0.99
    small = S.exp() <= eps
    assert small.any()
    q = support(S, T, top_p=top_p)
    assert torch.allclose(q[small], S[small], atol=1e-6)
    # and the nucleus keeps its mass: the teacher only reorders inside it
    outside_mass_S = (S.exp() * small).sum(-1)
    outside_mass_q = (q.exp() * small).sum(-1)
    assert torch.allclose(outside_mass_S, outside_mass_q, atol=1e-6)


@pytest.mark.parametrize("name", list(RULES))
def test_stable_with_minus_inf_and_bf16(name):
    S, T = rand_logp(2, 6, seed=10), rand_logp(2, 6, seed=11)
    S[..., :5] = float("-inf")  # tokens the student can never emit (e.g. masked vocabulary)
    T[..., 5:10] = float("-inf")
    T[0, 0] = float("-inf")  # a whole row where the teacher rules out some of the student's picks
    for dtype in (torch.float32, torch.bfloat16):
        logq = make_rule(name)(S.to(dtype), T.to(dtype))
        assert logq.dtype == torch.float32
        assert not torch.isnan(logq).any()
        assert torch.allclose(logq.exp().sum(-1), torch.ones(2, 6), atol=1e-4)
        assert torch.isfinite(kl(logq, S.to(dtype))).all()


def test_kl_gradient_is_p_minus_q():
    logits = torch.randn(3, V, requires_grad=True)
    logq = rand_logp(3, seed=12)
    kl(logq, logits.log_softmax(-1)).sum().backward()
    assert torch.allclose(logits.grad, logits.softmax(-1) - logq.exp(), atol=1e-5)


def test_unknown_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown rule 'bogus'"):
        make_rule("bogus")
