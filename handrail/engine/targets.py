"""Aggregation rules: the target `q = A(p_S, p_T)` the student is distilled towards.

Each rule is a pure function `(logp_S, logp_T, logp_0=None, **params) -> logq` over the last
(vocabulary) dimension, where `logp_0` is the *initial* student (the weights training started
from) on the same context, and None means the student has not moved yet (logp_0 = logp_S).
Inputs may hold `-inf` and may be bf16; outputs are float32 log-probabilities. The target is a
constant for the loss, so callers pass detached log-probs.

Why aggregate at all: a teacher that has seen the answer puts mass on tokens the student cannot
yet justify (the answer, before the work). Copying that mass teaches guessing. Each rule below
keeps the target near what the student already considers, and says how far it lets the teacher
pull. What each guarantees, and the tests that check it (tests/test_targets.py):

| rule          | teacher == student | a token with p_S(y) <= eps gets at most                       |
|---------------|--------------------|----------------------------------------------------------------|
| geometric     | q = p_S            | no bound: a one-hot teacher makes q one-hot (for lam > 0)      |
| trust-region  | q = p_S            | the x solving kl(x || eps) = delta; roughly (delta + ln 2)/ln(1/eps); and KL(q||p_S) <= delta always |
| support       | q = p_S            | eps itself, if y is outside the student's top-p nucleus (true whenever eps < (1 - top_p) / V) |
| none          | q = p_S            | no bound: q = p_T                                              |
| considered    | q = p_S if p_S = p_0 | eps itself, whenever eps < tau, *at the fixed point too*      |
| anchored      | q = p_0 if p_T = p_0 | the trust-region bound, measured from p_0, *at the fixed point too* |

**Fixed points.** Training moves the student towards q and q is recomputed every step, so what
a rule teaches in the end is its fixed point under "student := target", not one step's move.
The first four rules only look at the current student; their fixed point is the teacher itself
(e.g. trust-region walks there delta nats at a time), so with an answer-only hint every one of
them teaches guessing (benchmarks/HISTORY.md §3, BENCHMARKS.md §L3). `considered` and `anchored` measure from the initial
student p_0, which does not move, so their target does not either: a token the student did not
seriously consider when training began can never be handed over, however many steps pass
(tests/test_targets.py iterates them to convergence).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from handrail.errors import UsageError

FLOOR = -1e4  # stands in for -inf: exp(FLOOR) == 0 in float32, but FLOOR * 0 == 0, not nan


def _finite(logp: torch.Tensor) -> torch.Tensor:
    return logp.float().clamp(min=FLOOR)


def kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the last dimension; 0 * log 0 counts as 0."""
    logq, logp = _finite(logq), _finite(logp)
    return (logq.exp() * (logq - logp)).sum(-1).clamp(min=0.0)


def none(logp_S: torch.Tensor, logp_T: torch.Tensor, logp_0=None) -> torch.Tensor:
    """Plain privileged distillation: copy the teacher."""
    return F.log_softmax(_finite(logp_T), -1)


def geometric(logp_S: torch.Tensor, logp_T: torch.Tensor, logp_0=None, lam: float = 0.5) -> torch.Tensor:
    """log q ∝ (1 - lam) log p_S + lam log p_T. lam = 1/2 is the normalised geometric mean."""
    S, T = _finite(logp_S), _finite(logp_T)
    return F.log_softmax(S + lam * (T - S), -1)


def trust_region(logp_S: torch.Tensor, logp_T: torch.Tensor, logp_0=None, delta: float = 0.1,
                 lam_max: float = 1.0, iters: int = 16) -> torch.Tensor:
    """The geometric family with lam chosen per position as the largest value in [0, lam_max]
    with KL(q || p_S) <= delta: the teacher may move the student by at most `delta` nats here.
    KL(q_lam || p_S) grows monotonically with lam, so bisection finds it; the lower end is
    always feasible, so the bound holds exactly, not just up to bisection error."""
    S, T = _finite(logp_S), _finite(logp_T)

    def target(lam):
        return F.log_softmax(S + lam * (T - S), -1)

    q = target(torch.full(S.shape[:-1] + (1,), lam_max, device=S.device))
    # the search runs only where the teacher is more than delta away: usually a few positions, and
    # each iteration costs a pass over the vocabulary (a 49k-token one: most of a step otherwise)
    far = (kl(q, S) > delta).reshape(-1).nonzero().squeeze(-1)
    if not far.numel():
        return q
    V = S.shape[-1]
    S_far, T_far = S.reshape(-1, V)[far], T.reshape(-1, V)[far]

    def target_far(lam):
        return F.log_softmax(S_far + lam * (T_far - S_far), -1)

    lo, hi = torch.zeros(far.numel(), 1, device=S.device), torch.full((far.numel(), 1), lam_max, device=S.device)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = (kl(target_far(mid), S_far) <= delta)[..., None]
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return q.reshape(-1, V).index_copy(0, far, target_far(lo)).reshape(q.shape)


def nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the smallest set of top tokens with total probability >= top_p."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    p = sorted_logp.exp()
    keep_sorted = (p.cumsum(-1) - p) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def support(logp_S: torch.Tensor, logp_T: torch.Tensor, logp_0=None, top_p: float = 0.9) -> torch.Tensor:
    """Inside the student's top-p nucleus, the teacher's preferences, rescaled to the mass the
    student gives the nucleus; outside it, the student unchanged. The teacher may reorder what
    the student seriously considers, and can never promote anything else."""
    S, T = F.log_softmax(_finite(logp_S), -1), _finite(logp_T)
    keep = nucleus(S, top_p)
    log_mass = torch.logsumexp(S.masked_fill(~keep, float("-inf")), -1, keepdim=True)
    inside = F.log_softmax(T.masked_fill(~keep, float("-inf")), -1) + log_mass
    return torch.where(keep, inside, S)


def considered(logp_S: torch.Tensor, logp_T: torch.Tensor, logp_0=None, tau: float = 0.1) -> torch.Tensor:
    """The teacher may only reorder what the initial student seriously considers: tokens with
    p_0 >= tau (and p_0's own top token) get the teacher's preferences, rescaled to the mass p_0
    gives them; every other token keeps p_0. The target does not depend on the current student,
    so it is its own fixed point: a token below tau at the start stays at its initial probability,
    whatever the teacher says, while the student's serious candidates follow the teacher."""
    P0 = F.log_softmax(_finite(logp_S if logp_0 is None else logp_0), -1)
    T = _finite(logp_T)
    keep = (P0 >= math.log(tau)) | (P0 == P0.max(-1, keepdim=True).values)
    log_mass = torch.logsumexp(P0.masked_fill(~keep, float("-inf")), -1, keepdim=True)
    inside = F.log_softmax(T.masked_fill(~keep, float("-inf")), -1) + log_mass
    return torch.where(keep, inside, P0)


def anchored(logp_S: torch.Tensor, logp_T: torch.Tensor, logp_0=None, delta: float = 1.0,
             lam_max: float = 1.0) -> torch.Tensor:
    """The trust region around the *initial* student: the geometric mix of p_0 and p_T closest
    to the teacher with KL(q || p_0) <= delta. A budget on cumulative movement, not a step size:
    however long training runs, the student is pulled to at most delta nats from where it began."""
    return trust_region(logp_S if logp_0 is None else logp_0, logp_T, delta=delta, lam_max=lam_max)


def counterfactual(logp_T: torch.Tensor, logp_C: torch.Tensor, logp_0: torch.Tensor) -> torch.Tensor:
    """The counterfactual teacher: log p_E = log p_0 + log p_T - log p_C, normalised. p_C is the same
    teacher shown a *wrong* reference (another problem's), p_0 the initial student. What any
    reference makes the teacher say (a format, an answer stated up front, a style) is in p_T and
    p_C alike and cancels, leaving the initial student; only what the right reference makes more
    likely than a wrong one tilts it. Given to a rule in place of p_T, it moves the fixed point of
    the per-step rules from the teacher to p_E: the initial student, changed only where the
    reference itself is the reason (tests/test_targets.py)."""
    return F.log_softmax(_finite(logp_0) + _finite(logp_T) - _finite(logp_C), -1)


RULES: dict[str, Callable[..., torch.Tensor]] = {
    "none": none,
    "geometric": geometric,
    "trust-region": trust_region,
    "support": support,
    "considered": considered,
    "anchored": anchored,
}
NEEDS_INITIAL = {"considered", "anchored"}  # rules that read logp_0: training computes the initial model's pass


def make_rule(name: str, lam: float = 0.5, delta: float = 0.1, lam_max: float = 1.0,
              top_p: float = 0.9, tau: float = 0.1) -> Callable[..., torch.Tensor]:
    """Bind a rule's own parameters from the flat training config."""
    params = {"none": {}, "geometric": {"lam": lam}, "trust-region": {"delta": delta, "lam_max": lam_max},
              "support": {"top_p": top_p}, "considered": {"tau": tau},
              "anchored": {"delta": delta, "lam_max": lam_max}}
    if name not in RULES:
        raise UsageError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    rule = partial(RULES[name], **params[name])
    rule.needs_initial = name in NEEDS_INITIAL
    return rule
