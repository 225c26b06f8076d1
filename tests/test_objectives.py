"""Chunked losses equal the naive one-piece computation, in value and in gradient."""

import pytest
import torch

from handrail.engine.objectives import (chunked_sum, clipped_pg_chunk, cross_entropy_chunk, distill_chunk,
                                 naive_sum)
from handrail.engine.targets import RULES, make_rule

B, T, H, V = 3, 37, 16, 101


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    head_T = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head_T.weight.copy_(torch.randn(V, H, generator=g))
    hidden = torch.randn(B, T, H, generator=g)
    hidden_T = torch.randn(B, T, H, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    tokens = torch.randint(0, V, (B, T), generator=g)
    return head, head_T, hidden, hidden_T, mask, tokens


def run(summer, fn, args, **kw):
    head, hidden = args[0], args[1].clone().requires_grad_(True)
    head.zero_grad()
    out = summer(fn, hidden, head, *args[2:], **kw)
    out[0].backward()
    return [o.detach() for o in out], hidden.grad.clone(), head.weight.grad.clone()


def counter(hidden_T, head_T, on: bool):
    """A counterfactual teacher's (hidden, head): the teacher on other hidden states, or None."""
    return (hidden_T.flip(0), head_T) if on else None


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("counterfactual", [False, True])
def test_chunked_distill_equals_naive(rule, counterfactual):
    head, head_T, hidden, hidden_T, mask, _ = setup()
    fn = distill_chunk(make_rule(rule))
    hidden_0 = hidden + 0.3 * torch.randn(B, T, H, generator=torch.Generator().manual_seed(5))
    kw = dict(refs=((hidden_T, head_T), (hidden_0, head), counter(hidden_T, head_T, counterfactual)))
    a = run(chunked_sum, fn, (head, hidden, mask, None), chunk_size=8, **kw)
    b = run(naive_sum, fn, (head, hidden, mask, None), **kw)
    for x, y in zip(a[0], b[0]):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a[1], b[1], atol=1e-5)
    assert torch.allclose(a[2], b[2], atol=1e-4)
    assert a[0][0] > 0


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("anchor, counterfactual", [(False, False), (True, False), (False, True)])
def test_fused_distill_equals_naive_in_value_and_gradient(rule, anchor, counterfactual):
    """The gradient taken in forward (p_S - q per position) is the one autograd finds."""
    from handrail.engine.objectives import fused_distill_sum

    head, head_T, hidden, hidden_T, mask, _ = setup(3)
    hidden_0 = hidden + 0.3 * torch.randn(B, T, H, generator=torch.Generator().manual_seed(6))
    use_T = (torch.rand(B, T, generator=torch.Generator().manual_seed(7)) > 0.3).float() if anchor else None
    kw = dict(refs=((hidden_T, head_T), (hidden_0, head), counter(hidden_T, head_T, counterfactual)))
    a = run(lambda fn, h, hd, m, u, **k: fused_distill_sum(make_rule(rule), h, hd, m, u, chunk_size=8, **k),
            None, (head, hidden, mask, use_T), **kw)
    b = run(naive_sum, distill_chunk(make_rule(rule)), (head, hidden, mask, use_T), **kw)
    for x, y in zip(a[0], b[0]):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a[1], b[1], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-4)
    assert a[0][0] > 0 and a[1].abs().sum() > 0


def test_chunked_cross_entropy_and_pg_equal_naive():
    head, _, hidden, _, mask, tokens = setup(1)
    a = run(chunked_sum, cross_entropy_chunk, (head, hidden, tokens, mask), chunk_size=5)
    b = run(naive_sum, cross_entropy_chunk, (head, hidden, tokens, mask))
    assert torch.allclose(a[0][0], b[0][0], rtol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    old = torch.randn(B, T) * 0.1 - 4.0
    adv = torch.randn(B, 1).expand(B, T)
    fn = clipped_pg_chunk(0.2, 0.05)
    a = run(chunked_sum, fn, (head, hidden, tokens, old, old, adv, mask), chunk_size=7)
    b = run(naive_sum, fn, (head, hidden, tokens, old, old, adv, mask))
    assert torch.allclose(a[0][0], b[0][0], rtol=1e-4) and torch.allclose(a[1], b[1], atol=1e-5)


def test_no_gradient_reaches_the_teacher():
    head, head_T, hidden, hidden_T, mask, _ = setup(2)
    hidden_T.requires_grad_(True)
    out = chunked_sum(distill_chunk(make_rule("none")), hidden.requires_grad_(True), head, mask, None,
                      chunk_size=10, refs=((hidden_T, head_T), None, None))
    out[0].backward()
    assert hidden_T.grad is None and head_T.weight.grad is None


def test_divergence_gate_keeps_tokens_up_to_the_first_unlikely_one():
    import math

    from handrail.methods import until_divergence

    lp = torch.log(torch.tensor([[0.9, 0.5, 0.01, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9, 0.001],
                                 [0.001, 0.9, 0.9, 0.9, 0.9]]))
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = until_divergence(lp, mask, prob=0.05)
    assert got.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert torch.equal(until_divergence(lp, mask, prob=1e-9), mask)
    assert math.isclose(float(until_divergence(lp, mask, prob=1.0).sum()), 3.0)
    # gate=point keeps only the first divergent token; a row that never diverges gets no signal
    point = until_divergence(lp, mask, prob=0.05, only_at=True)
    assert point.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_grpo_loss_variants_average_as_their_papers_say():
    from handrail.methods import pg_token_weights

    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])  # a 4-token and a 1-token completion
    loss_tok = torch.tensor([[1.0, 1, 1, 1], [4, 0, 0, 0]])
    n_tok = mask.sum()

    def loop_loss(kind):  # what train.py computes: sum(weight * loss) / global token count
        return float((pg_token_weights(mask, kind, n_tok, 2, 8) * loss_tok * mask).sum() / n_tok)

    assert loop_loss("dapo") == pytest.approx(8 / 5)  # every token alike
    assert loop_loss("grpo") == pytest.approx((1 + 4) / 2)  # mean of the per-sequence means
    assert loop_loss("dr_grpo") == pytest.approx(8 / (2 * 8))  # sum / (sequences x max_new_tokens)


@pytest.mark.parametrize("rule", ["none", "trust-region", "considered"])
def test_topk_teacher_with_every_token_is_the_full_loss(rule):
    """K = V: the tail bucket is empty and the coarse loss is the full one, value and gradient,
    on the fused path (gradient from the expanded target) and the autograd one."""
    from handrail.engine.objectives import fused_distill_sum

    head, head_T, hidden, hidden_T, mask, _ = setup(4)
    hidden_0 = hidden + 0.3 * torch.randn(B, T, H, generator=torch.Generator().manual_seed(8))
    kw = dict(refs=((hidden_T, head_T), (hidden_0, head), None))
    full = run(naive_sum, distill_chunk(make_rule(rule)), (head, hidden, mask, None), **kw)
    for k in (V, V - 1):  # V - 1: one token in the tail alone, which is that token exactly
        auto = run(naive_sum, distill_chunk(make_rule(rule), topk=k), (head, hidden, mask, None), **kw)
        fused = run(lambda fn, h, hd, m, u, **kk: fused_distill_sum(make_rule(rule), h, hd, m, u, chunk_size=8,
                                                                    topk=k, **kk), None, (head, hidden, mask, None), **kw)
        for got in (auto, fused):
            assert torch.allclose(got[0][0], full[0][0], rtol=1e-4, atol=1e-4)
            assert torch.allclose(got[1], full[1], atol=1e-5) and torch.allclose(got[2], full[2], atol=1e-4)


def test_topk_teacher_small_k():
    """K < V: the coarse KL of plain distillation is below the full one (data processing), and the
    fused gradient (p_S minus the expanded target) is the one autograd finds."""
    from handrail.engine.objectives import fused_distill_sum

    head, head_T, hidden, hidden_T, mask, _ = setup(5)
    kw = dict(refs=((hidden_T, head_T), None, None))
    rule = make_rule("none")
    full = run(naive_sum, distill_chunk(rule), (head, hidden, mask, None), **kw)
    auto = run(naive_sum, distill_chunk(rule, topk=8), (head, hidden, mask, None), **kw)
    fused = run(lambda fn, h, hd, m, u, **kk: fused_distill_sum(rule, h, hd, m, u, chunk_size=8, topk=8, **kk),
                None, (head, hidden, mask, None), **kw)
    assert 0 < auto[0][0] < full[0][0]
    assert torch.allclose(fused[0][0], auto[0][0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(fused[1], auto[1], atol=1e-5) and torch.allclose(fused[2], auto[2], atol=1e-4)
