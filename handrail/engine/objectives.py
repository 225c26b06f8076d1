"""Per-token objectives over completion positions, computed in chunks over the sequence.

Every method's loss is a sum over completion tokens of some function of the student's logits
at that token. With a 49k vocabulary and 1k-token completions, the naive `B×T×V` float32 logits,
log-softmax, teacher log-probs and target would each be gigabytes, so `chunked_sum` applies the
LM head to one slice of positions at a time under activation checkpointing: only one chunk's
`b×c×V` tensors exist at any moment, forward or backward. `naive_sum` does the same maths in
one piece and exists for the tests. Self-distillation with a plain linear head goes one step
further (`fused_distill_sum`): its gradient is known in closed form, so it is taken chunk by
chunk in the forward pass and nothing is recomputed in backward.

A chunk function takes `(logits_B_C_V, *ref_logits_B_C_V, *per_token_B_C)` and returns a tuple of
scalar sums, the first of which is the loss; the rest are metrics. `refs` are other models'
(hidden states, LM head) pairs (the teacher, the initial student) turned into logits chunk by
chunk without gradient; a ref or per-token tensor given as None reaches the function as None.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from handrail.engine.targets import counterfactual, kl


Ref = tuple[torch.Tensor, torch.nn.Module] | None  # (hidden_B_T_H, lm_head) of a model without gradient


def _ref_logits(refs, s: int, e: int):
    with torch.no_grad():
        return tuple(None if r is None else r[1](r[0][:, s:e]).float() for r in refs)


def chunked_sum(fn: Callable, hidden_B_T_H: torch.Tensor, lm_head: torch.nn.Module,
                *per_token: torch.Tensor | None, chunk_size: int = 128,
                refs: tuple[Ref, ...] = ()) -> tuple[torch.Tensor, ...]:
    """Sum `fn` over sequence chunks; each chunk's logits (the student's, and each ref's) exist
    only while that chunk is computed, forward and backward."""
    totals = None
    T = hidden_B_T_H.shape[1]
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        args = [None if t is None else t[:, s:e] for t in per_token]

        def run(h, *a, s=s, e=e):
            return fn(lm_head(h).float(), *_ref_logits(refs, s, e), *a)

        out = checkpoint(run, hidden_B_T_H[:, s:e], *args, use_reentrant=False)
        totals = out if totals is None else tuple(x + y for x, y in zip(totals, out))
    return totals


def naive_sum(fn: Callable, hidden_B_T_H, lm_head, *per_token, refs: tuple[Ref, ...] = (), **_):
    return fn(lm_head(hidden_B_T_H).float(), *_ref_logits(refs, 0, hidden_B_T_H.shape[1]), *per_token)


# -- a top-k teacher --------------------------------------------------------------------------------
def topk_support(logp_T: torch.Tensor, k: int) -> torch.Tensor | None:
    """The teacher's K most likely tokens per position (what a served teacher sends), or None for
    the full distribution (k = 0, or k >= V)."""
    return None if not k or k >= logp_T.shape[-1] else logp_T.topk(k, dim=-1).indices


def coarsen(logp: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(..., V) log-probs -> (..., K + 1): the K tokens `idx`, then one tail bucket holding the
    rest of the mass. Both sides of a KL coarsened this way stay normalised (no renormalisation
    over K is needed), and the coarse KL is never above the full one (data processing)."""
    if idx is None:
        return logp
    tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([logp.gather(-1, idx), tail], dim=-1)


def expand_target(logq_c: torch.Tensor, logp_S: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The full-vocabulary q~ whose p_S - q~ is the gradient of KL(q_c || coarsen(p_S)) with
    respect to the student's logits: q_c on the K tokens, and the tail bucket's mass spread over
    the other tokens in proportion to the student's own probabilities there."""
    if idx is None:
        return logq_c.exp()
    p_S = logp_S.exp()
    rest = p_S.scatter(-1, idx, 0.0)
    share = rest / rest.sum(-1, keepdim=True).clamp(min=1e-30)
    return (share * logq_c[..., -1:].exp()).scatter(-1, idx, logq_c[..., :-1].exp())


# -- chunk functions -----------------------------------------------------------------------------
def _teacher_logp(logits_T, logits_0, logits_C):
    """(log p_T, log p_0) for the rule: the teacher itself, or with a counterfactual teacher's
    logits the teacher as targets.counterfactual makes it."""
    logp_T = F.log_softmax(logits_T, -1)
    logp_0 = None if logits_0 is None else F.log_softmax(logits_0, -1)
    if logits_C is not None:
        logp_T = counterfactual(logp_T, F.log_softmax(logits_C, -1), logp_0)
    return logp_T, logp_0



def distill_chunk(rule, intervene_kl: float = 0.01, topk: int = 0):
    """KL(q || p_S) with q = rule(p_S, p_T, p_0) held constant, p_0 being the initial student
    (None: not computed). With a counterfactual teacher p_C (the teacher shown a wrong reference;
    None: not computed), p_T is first replaced by targets.counterfactual(p_T, p_C, p_0). Where
    `use_T` is 0 (the teacher silenced, after_gate=anchor) p_0 stands in for the teacher. With `topk`, every distribution is first coarsened to the teacher's K
    most likely tokens plus a tail bucket (`coarsen`). Metrics: summed KL, positions where the
    teacher moved the student by more than `intervene_kl` nats, and KL(p_T || p_S) (how much the
    teacher disagrees before aggregation)."""

    def fn(logits_S, logits_T, logits_0, logits_C, mask, use_T):
        logp_S = F.log_softmax(logits_S, -1)
        with torch.no_grad():
            logp_T, logp_0 = _teacher_logp(logits_T, logits_0, logits_C)
            if use_T is not None:
                logp_T = torch.where(use_T[..., None] > 0, logp_T, logp_0)
            idx = topk_support(logp_T, topk)
            logp_T, logp_0 = coarsen(logp_T, idx), None if logp_0 is None else coarsen(logp_0, idx)
        logp_S = coarsen(logp_S, idx)
        with torch.no_grad():
            logq = rule(logp_S.detach(), logp_T, logp_0)
            raw = kl(logp_T, logp_S.detach())
        per_tok = kl(logq, logp_S)
        kl_const = per_tok.detach()
        return ((per_tok * mask).sum(), (kl_const * mask).sum(),
                ((kl_const > intervene_kl).float() * mask).sum(), (raw * mask).sum())

    return fn


class _FusedDistill(torch.autograd.Function):
    """distill_chunk's sums with the gradient taken in the forward pass, chunk by chunk. With q
    held constant, d KL(q || softmax(z)) / dz = softmax(z) - q, so each chunk's gradient with
    respect to the hidden states and the head's weight is known as soon as its target is: no
    chunk is recomputed in backward (which, under checkpointing, would run the rule's bisection
    twice), and nothing of size B x T x V outlives its chunk. Backward only scales what forward
    stored (B x T x H and the head's V x H)."""

    @staticmethod
    def forward(ctx, hidden, weight, mask, use_T, refs, rule, intervene_kl, chunk_size, topk):
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        totals = torch.zeros(4, dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[1], chunk_size):
            e = min(hidden.shape[1], s + chunk_size)
            h = hidden[:, s:e].detach()
            logp_S = F.log_softmax(F.linear(h, weight).float(), -1)
            logp_T, logp_0 = _teacher_logp(*_ref_logits(refs, s, e))
            if use_T is not None:
                logp_T = torch.where(use_T[:, s:e, None] > 0, logp_T, logp_0)
            idx = topk_support(logp_T, topk)
            S_c, T_c = coarsen(logp_S, idx), coarsen(logp_T, idx)
            logq = rule(S_c, T_c, None if logp_0 is None else coarsen(logp_0, idx))
            m = mask[:, s:e].float()
            per_tok = kl(logq, S_c)
            kl_sum = (per_tok * m).sum()  # the loss, and its value as a metric
            totals += torch.stack([kl_sum, kl_sum, ((per_tok > intervene_kl).float() * m).sum(),
                                   (kl(T_c, S_c) * m).sum()])
            g = (logp_S.exp() - expand_target(logq, logp_S, idx)) * m[..., None]  # d loss / d logits
            del logp_S, logp_T, logp_0, logq
            grad_h[:, s:e] = (g @ weight.float()).to(hidden.dtype)
            if grad_w is not None:
                grad_w += g.flatten(0, 1).T @ h.flatten(0, 1).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w, ctx.w_dtype = grad_w is not None, weight.dtype
        return totals

    @staticmethod
    def backward(ctx, grad_totals):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_totals[0]  # the metrics carry no gradient
        return (grad_h * scale, (grad_w * scale).to(ctx.w_dtype) if ctx.has_w else None,
                None, None, None, None, None, None, None)


def fusable(head) -> bool:
    """A plain bias-free linear head (any LoRA or quantised head goes the checkpointed way)."""
    return type(head) is torch.nn.Linear and head.bias is None


def fused_distill_sum(rule, hidden, head, mask, use_T=None, *, refs, intervene_kl: float = 0.01,
                      chunk_size: int = 128, topk: int = 0) -> tuple[torch.Tensor, ...]:
    """The same four sums as `chunked_sum(distill_chunk(rule, intervene_kl, topk), ...)` and the
    same gradients, at about the naive loss's time and the chunked loss's memory (_FusedDistill)."""
    out = _FusedDistill.apply(hidden, head.weight, mask, use_T, refs, rule, intervene_kl, chunk_size, topk)
    # the loss a copy, not a view of `out`: FSDP hooks a module's outputs, and warns on views
    return out[0].clone(), out[1].detach(), out[2].detach(), out[3].detach()


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) without materialising the log-softmax twice."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def cross_entropy_chunk(logits, tokens, mask):
    """SFT: negative log-likelihood of the given tokens."""
    nll = -token_logp(logits, tokens)
    return (nll * mask).sum(), (nll.detach() * mask).sum()


def clipped_pg_chunk(clip_eps: float, kl_coef: float):
    """GRPO's per-token clipped surrogate with a per-sequence advantage broadcast to tokens, and
    optionally the k3 estimator of KL(pi || pi_ref) against reference log-probs."""

    def fn(logits, tokens, old_logp, ref_logp, adv, mask):
        logp = token_logp(logits, tokens)
        ratio = (logp - old_logp).exp()
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        per_tok = -surrogate
        d = ref_logp - logp
        k3 = d.exp() - d - 1
        if kl_coef:
            per_tok = per_tok + kl_coef * k3
        clipped = ((ratio - 1).abs() > clip_eps).float().detach()
        return (per_tok * mask).sum(), (k3.detach() * mask).sum(), (clipped * mask).sum()

    return fn
