"""Property tests for the aggregation rules (targets.py), against the guarantees in its table."""

import math

import pytest
import torch
import torch.nn.functional as F

from handrail.engine.targets import RULES, geometric, kl, make_rule, none, support, trust_region

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


# -- fixed points: iterate "student := target" until it stops moving -------------------------------
def fixed_point(name, S0, T, iters=300, **params):
    rule, S = make_rule(name, **params), S0
    for _ in range(iters):
        S = rule(S, T, S0)
    return S, rule(S, T, S0)


def guessing_case(eps=1e-3, seed=13):
    """The initial student considers tokens 1 and 2 seriously and token 0 (the answer, before the
    work) at eps; the teacher, who has seen the answer, puts nearly everything on token 0 and
    prefers 2 over 1 among the rest."""
    S0 = rand_logp(16, seed=seed).clone()
    S0[:, 1], S0[:, 2] = math.log(0.5), math.log(0.3)
    S0[:, 0] = -30.0
    rest = S0[:, 3:].exp().sum(-1, keepdim=True)
    S0[:, 3:] = (S0[:, 3:].exp() / rest * (0.2 - eps)).log()
    S0[:, 0] = math.log(eps)
    T = torch.full_like(S0, -12.0)
    T[:, 0], T[:, 1], T[:, 2] = 5.0, -2.0, 0.0
    return S0, T.log_softmax(-1)


@pytest.mark.parametrize("name", ["trust-region", "geometric", "none", "support"])
def test_per_step_rules_converge_to_the_teacher(name):
    """Why the first four rules cannot block guessing: a guess the initial student makes 5% of
    the time (inside its top-0.97 nucleus) becomes its mode at their fixed point."""
    S0, T = guessing_case(eps=0.05)
    S, _ = fixed_point(name, S0, T, iters=200, delta=1.0, top_p=0.97)
    assert (S.exp()[:, 0] > 0.5).all()


@pytest.mark.parametrize("eps", [1e-4, 1e-3, 0.05])
def test_considered_keeps_unconsidered_tokens_at_the_fixed_point(eps):
    tau = 0.1
    S0, T = guessing_case(eps)
    S, q = fixed_point("considered", S0, T, tau=tau)
    assert torch.allclose(S, q, atol=1e-5)  # converged
    assert (S.exp()[:, 0] <= eps * (1 + 1e-4)).all()  # never more than the initial student gave it
    # the student's serious candidates are reordered to the teacher's preference (2 over 1), and
    # together keep the mass the initial student gave them; the rest keep their initial mass
    assert (S[:, 2] > S[:, 1]).all()
    serious = S0.exp() >= tau
    assert torch.allclose((S.exp() * serious).sum(-1), (S0.exp() * serious).sum(-1), atol=1e-4)
    assert torch.allclose(S[~serious], S0[~serious], atol=1e-4)


@pytest.mark.parametrize("delta", [0.1, 1.0])
def test_anchored_bounds_unconsidered_tokens_at_the_fixed_point(delta):
    eps = 1e-4
    S0, T = guessing_case(eps)
    S, q = fixed_point("anchored", S0, T, delta=delta)
    assert torch.allclose(S, q, atol=1e-5)
    assert (kl(S, S0) <= delta + 1e-4).all()  # a budget on the whole journey, not on one step
    bound = (delta + math.log(2)) / math.log(1 / eps)
    assert (S.exp()[:, 0] <= bound).all()
    assert (S.exp()[:, 0] < 0.5).all()  # where trust-region (per step) ends above 0.5


def test_considered_lets_the_teacher_decide_among_serious_candidates():
    """A student that half-believes a wrong step (0.7) and half the right one (0.3): the teacher's
    preference for the right one is adopted in full, since both were seriously considered."""
    S0 = torch.full((1, V), -20.0)
    S0[0, 0], S0[0, 1] = math.log(0.7), math.log(0.3)
    S0 = S0.log_softmax(-1)
    T = torch.full((1, V), -20.0)
    T[0, 1] = 0.0
    S, _ = fixed_point("considered", S0, T.log_softmax(-1), tau=0.1)
    assert S.exp()[0, 1] > 0.99


def test_rules_that_read_the_initial_student_fall_back_to_the_current_one():
    """logp_0 = None means the student has not moved yet (decoding, the first step)."""
    S, T = rand_logp(4, 6, seed=14), rand_logp(4, 6, seed=15)
    for name in ("considered", "anchored"):
        rule = make_rule(name)
        assert rule.needs_initial
        assert torch.allclose(rule(S, T), rule(S, T, S))
    assert not make_rule("trust-region").needs_initial


@pytest.mark.parametrize("name", ["trust-region", "geometric", "none", "support", "anchored", "considered"])
def test_a_counterfactual_teacher_cancels_what_any_reference_makes_it_say(name):
    """The guessing case again, but the teacher shown a *wrong* reference puts as much on token 0
    (stating an answer first is what any reference invites): the counterfactual teacher gives every
    rule a fixed point at the initial student, where plain teachers moved the guess to the mode."""
    from handrail.engine.targets import counterfactual

    S0, T = guessing_case(eps=0.05)
    E = counterfactual(T, T.clone(), S0)
    assert torch.allclose(E, S0, atol=1e-5)
    S, _ = fixed_point(name, S0, E, iters=200, delta=1.0, top_p=0.97)
    assert torch.allclose(S.exp(), S0.exp(), atol=1e-3)


def test_a_counterfactual_teacher_keeps_what_only_the_right_reference_gives():
    """Where only the right reference favours a token (2 over 1), the per-step fixed point is the
    initial student tilted towards it by exactly that evidence, and the format both teachers share
    (token 0) moves nowhere."""
    from handrail.engine.targets import counterfactual

    S0, T = guessing_case(eps=0.05)
    C = T.clone()
    C[:, 2], C[:, 1] = T[:, 1], T[:, 2]  # a wrong reference prefers 1 over 2: the right one's evidence is for 2
    E = counterfactual(T, C.log_softmax(-1), S0)
    S, _ = fixed_point("trust-region", S0, E, iters=300, delta=1.0)
    assert torch.allclose(S, E, atol=1e-4)
    assert (S.exp()[:, 2] > 0.8).all()  # 0.3 * e^2 against 0.5 * e^-2: the reference's choice
    assert torch.allclose(S.exp()[:, 0], S0.exp()[:, 0] * (S.exp()[:, 2] / S0.exp()[:, 2]) / math.exp(2), atol=1e-4)
