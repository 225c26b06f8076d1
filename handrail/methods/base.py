"""The contract every method fulfils (`Method`), the typed signals its `score` hands its `loss`, and
the helpers several methods share."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Callable

import torch

from handrail.engine.objectives import token_logp
from handrail.engine.rollout import Rollout, given_rollout, left_pad, positions
from handrail.errors import UsageError
from handrail.runtime.evaluate import PromptIds, is_correct
from handrail.runtime.models import AdapterOff


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


def frozen_copy(lm):
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


METHODS: dict[str, type[Method]] = {}  # name -> class, filled as handrail.methods imports each method's module
OFF = {"counterfactual": "none", "teacher_topk": 0, "kl_coef": 0.0, "gate": "none"}  # any method may set these


def foreign_option(method: type[Method], cfg) -> str | None:
    """The first key of `cfg` that only other methods read and that is set away from its default
    (or its OFF value), or None."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return next((key for key in sorted(method.foreign())
                 if getattr(cfg, key) not in (defaults[key], OFF.get(key, defaults[key]))), None)


@dataclass
class Options:
    """A method's own config keys: subclass it as a dataclass in the method's file, one field a key
    with its default and a comment that documents it, and `RANGES` / `CHOICES` as for any config
    (config.py). The training config is the shared keys plus every method's (`with_options`), so the
    keys stay flat (`delta=0.5` on the command line, `cfg.delta` in code) and a new method's options
    need no other file."""

    RANGES: typing.ClassVar[dict] = {}
    CHOICES: typing.ClassVar[dict] = {}


def with_options(shared: type, name: str, module: str) -> type:
    """The dataclass `name`: the fields, ranges, choices and methods of `shared`, then every
    registered method's option fields. A key two methods both declare (a method extending another
    inherits its options) must have one type and one default."""
    hints = typing.get_type_hints(shared)
    seen = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(shared)}
    added, ranges, choices = [], dict(shared.RANGES), dict(shared.CHOICES)
    for method in METHODS.values():
        opts = method.Options
        declared = typing.get_type_hints(opts)
        for f in dataclasses.fields(opts):
            if f.name in seen:
                if seen[f.name] != (declared[f.name], f.default):
                    raise TypeError(f"option {f.name!r} of {method.__name__} is declared twice, differently")
                continue
            seen[f.name] = (declared[f.name], f.default)
            added.append((f.name, declared[f.name], dataclasses.field(default=f.default)))
        for k in reversed(opts.__mro__):  # an extended method's ranges and choices too
            ranges.update(vars(k).get("RANGES", {}))
            choices.update(vars(k).get("CHOICES", {}))
    cls = dataclasses.make_dataclass(name, added, bases=(shared,), namespace={"RANGES": ranges, "CHOICES": choices})
    cls.__module__, cls.__qualname__, cls.__doc__ = module, name, shared.__doc__
    return cls


class Method:
    """One way to train: how it gets rollouts, the signal it scores them into, and its loss. A new
    method is a subclass in its own file, registered by name: `class Mine(Method, name="mine")`."""

    needs_rollouts = True
    privileged = False  # reads a teacher prompt with the reference (its records must fit with the hint)
    needs_solutions = True  # answer-only records get worked solutions first (bootstrap) unless this is False
    rewarded = False  # trains on a verifier's reward, which a curriculum may shape
    grouped = False  # compares completions within a prompt's group (needs samples_per_prompt >= 2)
    distils = False  # its target is self-distillation's (a counterfactual teacher, guided or logged rollouts apply)
    one_per_prompt = False  # compare gives it one rollout (or search) per prompt: what it spends fills the step
    cost_varies = False  # what a step spends is known only once it has run (compare evaluates every step)
    reads_logged = False  # trains on logged conversations' turns (rollout=logged), generating nothing
    # The config keys this method reads that some other method does not: its own options. A run
    # that sets another method's option would have it silently ignored, so `check` refuses that.
    Options: type[Options] = Options

    def __init_subclass__(cls, name: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if name is not None:
            METHODS[name] = cls

    @classmethod
    def reads(cls) -> frozenset[str]:
        """Its own options (those of the methods it extends included: its Options extends theirs)."""
        return frozenset(f.name for f in dataclasses.fields(cls.Options))

    @classmethod
    def foreign(cls) -> frozenset[str]:
        """The options other methods read and this one does not."""
        return frozenset().union(*(m.reads() for m in METHODS.values())) - cls.reads()

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
        from handrail.methods import curriculum

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



@torch.no_grad()
def token_logps(hidden, head, tokens, temperature, chunk):
    out = []
    for s in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, s:s + chunk]).float() / max(temperature, 1e-6)
        out.append(token_logp(logits, tokens[:, s:s + chunk]))
    return torch.cat(out, dim=1)
