"""What makes one method differ from another: its per-token training signal.

Every method gives the loop in commands/train.py the same four things: whether it samples student
rollouts, how it `score`s them (no grad; the other processes seen only through a `World`) into a
small typed signal (DistillSignal, PolicySignal, HybridSignal; SFT needs none), the chunked `loss`
it computes from that signal on the student's hidden states (run inside the policy's forward:
`student_loss`), and what to do `after_step`. Nothing else differs between methods — the loop,
the rollout accounting and the evaluation are shared.
"""

from __future__ import annotations

from handrail.methods.base import (METHODS, Method, Options, World, completion_hidden, until_divergence,  # noqa: F401
                                   with_options)

# Each import registers a method under the name a config gives it (`class X(Method, name=...)`),
# in this order; one file per method.
from handrail.methods.self_distill import SelfDistill  # noqa: F401
from handrail.methods.grpo import GRPO, pg_token_weights  # noqa: F401
from handrail.methods.sft import SFT  # noqa: F401
from handrail.methods.rlsd import RLSD  # noqa: F401
from handrail.methods.srpo import SRPO  # noqa: F401
from handrail.methods.vine import Vine, branch_points, step_advantages  # noqa: F401
from handrail.methods.expert_iteration import ExpertIteration  # noqa: F401

