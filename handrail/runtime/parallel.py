"""How the policy is spread over processes, and all the loop needs to know of it.

Three strategies behind one face: a single process; data-parallel (accelerate's DDP: every process
holds the whole model and gradients are averaged); sharded (`fsdp: true`, torch's FSDP2 through
sharding.Shards: weights, gradients and optimizer moments split across processes). The loop asks
each the same things: the policy to run the training forward on, the optimizer, the plain model
to sample from, gradient clipping, what to do after an optimizer step, and how the optimizer's
state is saved and read back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from handrail.runtime.sharding import Shards, by_position, load_optimizer


class Parallel:
    """Built in two stages: the constructor makes the optimizer and loads its state (before the
    run folder is touched, so a bad checkpoint fails first); `prepare()` then hands both to
    accelerate (a collective with several processes)."""

    def __init__(self, acc, policy, cfg, opt_state: dict | Path | None = None, log=print):
        self.acc = acc
        if cfg.fsdp and acc.num_processes == 1:
            log("fsdp: a single process has nothing to shard; training unsharded")
        # sharded: the optimizer must see the sharded parameters, so it comes after
        self.shards = Shards(policy, cfg.mixed_precision) if cfg.fsdp and acc.num_processes > 1 else None
        self.name = "fsdp" if self.shards else ("ddp" if acc.num_processes > 1 else "single")
        # fused: one kernel for the whole update (what transformers' Trainer, and so TRL, uses by
        # default); sharded parameters take foreach, a few calls instead of a few per tensor
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay,
                                     **({"foreach": True} if self.shards else {"fused": True}))
        if isinstance(opt_state, Path):  # a sharded run's: its shards, read by every process
            load_optimizer(policy, self.opt, opt_state)
        elif opt_state is not None:
            if self.shards:
                self.shards.load_optimizer_state(self.opt, opt_state)
            else:
                self.opt.load_state_dict(by_position(policy, opt_state))
        self.policy = policy
        self._plain = policy.lm

    def prepare(self) -> None:
        if self.shards is None:
            self.policy, self.opt = self.acc.prepare(self.policy, self.opt)
            self._plain = self.acc.unwrap_model(self.policy).lm  # the same module throughout

    def lm(self):
        """The policy's weights as a plain model, for everything but the training forward."""
        return self.shards.rollout_lm if self.shards else self._plain

    def clip(self, max_norm: float) -> float:
        if self.shards:
            return self.shards.clip_grad_norm_(max_norm)
        return float(self.acc.clip_grad_norm_(self.policy.parameters(), max_norm))

    def step(self, finite: bool) -> None:
        """The optimizer step (skipped when the loss or gradient is not finite: it would write NaN
        into every weight), the sampling copy refreshed, the gradients cleared."""
        if finite:
            self.opt.step()
        if self.shards:  # a collective: every process joins it, stepped or not
            self.shards.refresh()
        self.opt.zero_grad(set_to_none=True)

    def save_optimizer(self, folder: Path) -> None:
        """Called on every process: sharded, each writes its own shards; otherwise the main one
        writes optimizer.pt."""
        if self.shards:
            self.shards.save_optimizer(self.opt, folder / "optimizer")
        elif self.acc.is_main_process:
            torch.save(self.opt.state_dict(), folder / "optimizer.pt")
